#!/usr/bin/env bash
# bert-base-uncased -> MiniLMv2's 6x384 student (12 heads, random init: its width is its own) on wikitext-103:
# qq_rel + kk_rel + vv_rel (48 relation heads, teacher layer 12), fp16 O2.
# usage: scripts/distill_minilmv2.sh [NUM_GPUS=1] [OUTPUT_DIR=runs/minilmv2_6x384] [more distill-train --field value overrides]
exec "$(dirname "$0")/run_recipe.sh" minilmv2_6x384.json "$@"
