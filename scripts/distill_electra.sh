#!/usr/bin/env bash
# ELECTRA-base discriminator layers 1,5,8,12 -> 4-layer discriminator, inputs corrupted by the ELECTRA-base generator: Hentschel et al. 2021 style rtd + rtd_kl + MSE + cos terms, fp16 O2.
# usage: scripts/distill_electra.sh [NUM_GPUS=1] [OUTPUT_DIR=runs/distill_electra] [more distill-train --field value overrides]
# Recipe (every field documented in the README): student_configs/electra_base_4l.json
set -euo pipefail
GPUS=${1:-1}
OUT=${2:-runs/distill_electra}
shift $(( $# < 2 ? $# : 2 ))
HERE="$(cd "$(dirname "$0")" && pwd)"
exec torchrun --standalone --nproc_per_node "$GPUS" --no-python \
  distill-train --config "$HERE/../student_configs/electra_base_4l.json" --output_dir "$OUT" "$@"
