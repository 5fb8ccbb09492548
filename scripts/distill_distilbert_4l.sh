#!/usr/bin/env bash
# distilbert-base-uncased layers 1,3,4,6 -> 4-layer DistilBERT on wikitext-103: 5*ce + 2*mlm + 1*cos, fp16 O2.
# usage: scripts/distill_distilbert_4l.sh [NUM_GPUS=1] [OUTPUT_DIR=runs/distilbert_4l_1-3-4-6] [more distill-train --field value overrides]
exec "$(dirname "$0")/run_recipe.sh" distilbert_4l_1-3-4-6.json "$@"
