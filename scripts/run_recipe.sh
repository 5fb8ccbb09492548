#!/usr/bin/env bash
# Runs one recipe of student_configs/ with torchrun; the distill_*.sh scripts call this.
# usage: scripts/run_recipe.sh RECIPE.json [NUM_GPUS=1] [OUTPUT_DIR=runs/<recipe>] [more --field value overrides]
# The recipe's global batch (per-device batch x accumulation x GPUs) is kept: its gradient_accumulation_steps
# is divided by NUM_GPUS, which must divide it (e.g. 1, 2, 4 or 8 GPUs for a recipe of 8 steps).
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
CONFIG="$HERE/../student_configs/$1"
GPUS=${2:-1}
OUT=${3:-runs/$(basename "$1" .json)}
shift $(( $# < 3 ? $# : 3 ))
# the accumulation steps, divided by the GPU count; a count that does not divide them would change the global batch
ACC=$(python - "$CONFIG" "$GPUS" <<'PY'
import json, sys
recipe, gpus = sys.argv[1], sys.argv[2]
acc = json.load(open(recipe)).get("gradient_accumulation_steps", 1)
if not gpus.isdigit() or int(gpus) < 1 or acc % int(gpus):
    sys.exit(f"run_recipe.sh: NUM_GPUS {gpus!r} does not divide the recipe's gradient_accumulation_steps {acc}, so "
             f"the global batch would change: use a GPU count that divides {acc}")
print(acc // int(gpus))
PY
)
exec torchrun --standalone --nproc_per_node "$GPUS" --no-python \
  distill-train --config "$CONFIG" --gradient_accumulation_steps "$ACC" --output_dir "$OUT" "$@"
