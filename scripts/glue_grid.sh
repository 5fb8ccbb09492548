#!/usr/bin/env bash
# Grade a model on GLUE dev over the seed report's grid: lr {1e-5,5e-5,1e-4} x batch {16,32} x seeds {1,2,3},
# 3 epochs, the nine tasks (162 runs), then write OUT/report.md and OUT/report.png.
# usage: scripts/glue_grid.sh MODEL OUT [more glue-eval flags, e.g. --data_dir GLUE_DIR --bf16 --teacher_results DIR]
# Env: GRID=grid.json (default: the seed report's grid), TASKS=rte,mrpc (default: the grid's tasks, all nine).
# Killed? Run the same command again: finished cells (OUT/<task>/<cell>/result.json) are skipped.
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: scripts/glue_grid.sh MODEL OUT [glue-eval flags]" >&2
  exit 2
fi
MODEL=$1
OUT=$2
shift 2
# --teacher_results belongs to the report, everything else to the runs.
RUN_ARGS=() REPORT_ARGS=()
while [ $# -gt 0 ]; do
  case $1 in
    --teacher_results) REPORT_ARGS+=("$1" "$2"); shift 2 ;;
    --teacher_results=*) REPORT_ARGS+=("$1"); shift ;;
    *) RUN_ARGS+=("$1"); shift ;;
  esac
done
TASK_ARGS=()
if [ -n "${TASKS:-}" ]; then TASK_ARGS=(--task "$TASKS"); fi
glue-eval --model "$MODEL" --grid "${GRID:-default}" "${TASK_ARGS[@]}" --output_dir "$OUT" "${RUN_ARGS[@]}"
glue-eval report "$OUT" "${REPORT_ARGS[@]}"
