#!/usr/bin/env bash
# bert-base-uncased layers 1,5,8,12 -> 4-layer DistilBERT on wikitext-103: 5*ce + 2*mlm + 1*att_mse (the seed report's variant), fp16 O2.
# usage: scripts/distill_bert_4l_attn.sh [NUM_GPUS=1] [OUTPUT_DIR=runs/distill_bert_4l_attn] [more distill-train --field value overrides]
# Recipe (every field documented in the README): student_configs/bert_4l_1-5-8-12_attn.json
set -euo pipefail
GPUS=${1:-1}
OUT=${2:-runs/distill_bert_4l_attn}
shift $(( $# < 2 ? $# : 2 ))
HERE="$(cd "$(dirname "$0")" && pwd)"
CONFIG="$HERE/../student_configs/bert_4l_1-5-8-12_attn.json"
# keep the recipe's global batch (per-device batch x accumulation x GPUs): divide its accumulation by the GPU count
ACC=$(python -c "import json,sys; print(max(1, json.load(open(sys.argv[1]))['gradient_accumulation_steps'] // int(sys.argv[2])))" "$CONFIG" "$GPUS")
exec torchrun --standalone --nproc_per_node "$GPUS" --no-python \
  distill-train --config "$CONFIG" --gradient_accumulation_steps "$ACC" --output_dir "$OUT" "$@"
