#!/usr/bin/env bash
# all-mpnet-base-v2 layers 1,5,8,12 -> 4-layer MPNet sentence encoder on wikitext-103: hid_mse + att_mse + sent_mse,
# fp16 O2 (student_configs/mpnet_4l_1-5-8-12.json). Without the hub, add: --teacher offline:all-mpnet-base-v2
# Then score it with the teacher beside it: embed-eval --model offline:all-mpnet-base-v2 --model OUTPUT_DIR --output_dir OUTPUT_DIR-embed
# usage: scripts/distill_mpnet_4l.sh [NUM_GPUS=1] [OUTPUT_DIR=runs/mpnet_4l_1-5-8-12] [more distill-train --field value overrides]
exec "$(dirname "$0")/run_recipe.sh" mpnet_4l_1-5-8-12.json "$@"
