#!/usr/bin/env bash
# Several QA teachers, fixed weights (docs/glue.md, "Several teachers"; docs/qa.md): BERT-base and BERT-large (both
# uncased: one tokenizer) fine-tuned on SQuAD v1.1, then a 6-layer student (layers 1,3,5,8,10,12 of BERT-base)
# fine-tuned with the weighted mixture of their start/end distributions, 0.5*kl at T=2 + 0.5*hard_ce.
# usage: scripts/distill_qa_multi.sh OUT [more glue-eval flags, e.g. --data_dir SQUAD_DIR --eval_files ood/duorc.json]
# Env: TEACHERS="bert-base-uncased bert-large-uncased" (any list sharing one tokenizer), WEIGHTS=0.4,0.6 (one per
# teacher, in order; normalised), STUDENT=a student folder (default: OUT/student from distill-init of the first
# teacher), TASK=squad. Cost: about 2 GPU-hours per base teacher, 6 for large, 1 for the student (estimates).
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: scripts/distill_qa_multi.sh OUT [glue-eval flags]" >&2
  exit 2
fi
OUT=$1
shift
read -r -a TEACHERS <<< "${TEACHERS:-bert-base-uncased bert-large-uncased}"
WEIGHTS=${WEIGHTS:-0.4,0.6}
TASK=${TASK:-squad}
QA=(--task "$TASK" --max_seq_length 384 --doc_stride 128 --per_device_train_batch_size 32 --seed 42)
TEACHER_ARGS=()
for i in "${!TEACHERS[@]}"; do
  glue-eval --model "${TEACHERS[$i]}" "${QA[@]}" --learning_rate 3e-5 --num_train_epochs 2 --save_model \
    --output_dir "$OUT/teacher$i" "$@"
  TEACHER_ARGS+=(--teacher "$(find "$OUT/teacher$i/$TASK" -mindepth 2 -maxdepth 2 -name model -type d | sort | head -n 1)")
done
STUDENT=${STUDENT:-$OUT/student}
if [ ! -e "$STUDENT/config.json" ]; then
  distill-init --teacher "${TEACHERS[0]}" --layers 1,3,5,8,10,12 --student-type distilbert --output "$STUDENT"
fi
glue-eval --model "$STUDENT" "${QA[@]}" --learning_rate 5e-5 --num_train_epochs 3 "${TEACHER_ARGS[@]}" \
  --teacher_weights "$WEIGHTS" --distill_weights '{"kl": 0.5, "hard_ce": 0.5}' --temperature 2 \
  --output_dir "$OUT/distilled" "$@"
echo "results: $OUT/teacher*/results.jsonl and $OUT/distilled/results.jsonl"
