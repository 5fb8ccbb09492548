#!/usr/bin/env bash
# Runs one recipe of student_configs/ with torchrun; the distill_*.sh scripts call this.
# usage: scripts/run_recipe.sh RECIPE.json [NUM_GPUS=1] [OUTPUT_DIR=runs/<recipe>] [more --field value overrides]
# The recipe's global batch (per-device batch x accumulation x GPUs) is kept on any GPU count:
# its gradient_accumulation_steps is divided by NUM_GPUS.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
CONFIG="$HERE/../student_configs/$1"
GPUS=${2:-1}
OUT=${3:-runs/$(basename "$1" .json)}
shift $(( $# < 3 ? $# : 3 ))
ACC=$(python -c "import json,sys; print(max(1, json.load(open(sys.argv[1]))['gradient_accumulation_steps'] // int(sys.argv[2])))" "$CONFIG" "$GPUS")
exec torchrun --standalone --nproc_per_node "$GPUS" --no-python \
  distill-train --config "$CONFIG" --gradient_accumulation_steps "$ACC" --output_dir "$OUT" "$@"
