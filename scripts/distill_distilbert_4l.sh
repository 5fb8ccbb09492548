#!/usr/bin/env bash
# distilbert-base-uncased layers 1,3,4,6 -> 4-layer DistilBERT on wikitext-103: 5*ce + 2*mlm + 1*cos, fp16 O2.
# usage: scripts/distill_distilbert_4l.sh [NUM_GPUS=1] [OUTPUT_DIR=runs/distill_distilbert_4l] [more distill-train --field value overrides]
# Recipe (every field documented in the README): student_configs/distilbert_4l_1-3-4-6.json
set -euo pipefail
GPUS=${1:-1}
OUT=${2:-runs/distill_distilbert_4l}
shift $(( $# < 2 ? $# : 2 ))
HERE="$(cd "$(dirname "$0")" && pwd)"
exec torchrun --standalone --nproc_per_node "$GPUS" --no-python \
  distill-train --config "$HERE/../student_configs/distilbert_4l_1-3-4-6.json" --output_dir "$OUT" "$@"
