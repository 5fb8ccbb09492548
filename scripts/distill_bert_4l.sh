#!/usr/bin/env bash
# bert-base-uncased layers 1,5,8,12 -> 4-layer DistilBERT on wikitext-103: 5*ce + 2*mlm + 1*cos, fp16 O2 (student_configs/bert_4l_1-5-8-12.json).
# usage: scripts/distill_bert_4l.sh [NUM_GPUS=1] [OUTPUT_DIR=runs/bert_4l_1-5-8-12] [more distill-train --field value overrides]
exec "$(dirname "$0")/run_recipe.sh" bert_4l_1-5-8-12.json "$@"
