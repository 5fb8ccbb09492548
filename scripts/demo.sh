#!/usr/bin/env bash
# The offline demo: all-MiniLM-L6-v2 (6 layers) -> a 3-layer student from layers 2,4,6, distilled with
# cos + hid_mse + att_mse on a real Wikipedia extract. About 1-7 minutes on 2 CPU cores, by what the CPU has (README: The demo).
# usage: scripts/demo.sh [OUTPUT_DIR=runs/demo-minilm-3l] [more distill-train --field value overrides]
set -euo pipefail
OUT=${1:-runs/demo-minilm-3l}
shift $(( $# < 1 ? $# : 1 ))
HERE="$(cd "$(dirname "$0")" && pwd)"
exec distill-train --config "$HERE/../student_configs/demo_minilm_3l.json" --output_dir "$OUT" "$@"
