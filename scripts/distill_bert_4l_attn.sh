#!/usr/bin/env bash
# bert-base-uncased layers 1,5,8,12 -> 4-layer DistilBERT on wikitext-103: 5*ce + 2*mlm + 1*att_mse (the seed report's variant), fp16 O2.
# usage: scripts/distill_bert_4l_attn.sh [NUM_GPUS=1] [OUTPUT_DIR=runs/bert_4l_1-5-8-12_attn] [more distill-train --field value overrides]
exec "$(dirname "$0")/run_recipe.sh" bert_4l_1-5-8-12_attn.json "$@"
