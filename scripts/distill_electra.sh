#!/usr/bin/env bash
# ELECTRA-base discriminator layers 1,5,8,12 -> 4-layer discriminator, inputs corrupted by the ELECTRA-base generator: rtd + rtd_kl + MSE + cos terms (Hentschel et al. 2021), fp16 O2.
# usage: scripts/distill_electra.sh [NUM_GPUS=1] [OUTPUT_DIR=runs/electra_base_4l] [more distill-train --field value overrides]
exec "$(dirname "$0")/run_recipe.sh" electra_base_4l.json "$@"
