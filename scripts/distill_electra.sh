#!/usr/bin/env bash
# ELECTRA-base discriminator layers 1,5,8,12 -> 4-layer discriminator, inputs corrupted by the ELECTRA-base generator: Hentschel et al. 2021 style rtd + rtd_kl + MSE + cos terms, fp16 O2.
# usage: scripts/distill_electra.sh [NUM_GPUS=1] [OUTPUT_DIR=runs/distill_electra] [more distill-train --field value overrides]
# Recipe (every field documented in the README): student_configs/electra_base_4l.json
set -euo pipefail
GPUS=${1:-1}
OUT=${2:-runs/distill_electra}
shift $(( $# < 2 ? $# : 2 ))
HERE="$(cd "$(dirname "$0")" && pwd)"
CONFIG="$HERE/../student_configs/electra_base_4l.json"
# keep the recipe's global batch (per-device batch x accumulation x GPUs): divide its accumulation by the GPU count
ACC=$(python -c "import json,sys; print(max(1, json.load(open(sys.argv[1]))['gradient_accumulation_steps'] // int(sys.argv[2])))" "$CONFIG" "$GPUS")
exec torchrun --standalone --nproc_per_node "$GPUS" --no-python \
  distill-train --config "$CONFIG" --gradient_accumulation_steps "$ACC" --output_dir "$OUT" "$@"
