#!/usr/bin/env bash
# bert-base-uncased layers 1,5,8,12 -> 4 layers with hid_mse + att_mse (the mpnet study's row, docs/study-mpnet.md, on bert-base) on wikitext-103, precision auto.
# usage: scripts/distill_bert_4l_hid_att.sh [NUM_GPUS=1] [OUTPUT_DIR=runs/bert_4l_1-5-8-12_hid_att] [more distill-train --field value overrides]
exec "$(dirname "$0")/run_recipe.sh" bert_4l_1-5-8-12_hid_att.json "$@"
