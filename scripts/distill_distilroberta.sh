#!/usr/bin/env bash
# roberta-base layers 1,3,5,8,10,12 -> 6-layer DistilRoBERTa on wikitext-103: 5*ce + 2*mlm + 1*cos, fp16 O2 (student_configs/distilroberta_6l.json).
# usage: scripts/distill_distilroberta.sh [NUM_GPUS=1] [OUTPUT_DIR=runs/distilroberta_6l] [more distill-train --field value overrides]
exec "$(dirname "$0")/run_recipe.sh" distilroberta_6l.json "$@"
