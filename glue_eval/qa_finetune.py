"""One extractive-QA cell: the same pipeline as a sentence task's, with QA's model, training windows and scoring.

encoded windows (:func:`glue_eval.qa.encode_splits`) -> ``AutoModelForQuestionAnswering`` -> train, plain
(:func:`glue_eval.trainer.train_plain`: the model's own span loss) or with the teacher's stages
(:mod:`glue_eval.qa_distill`) -> evaluate: every window's start/end logits, decoded over each example's
windows (:func:`glue_eval.qa.decode`), scored with SQuAD's EM/F1 (:mod:`glue_eval.squad_metrics`), one entry
per dev set (the in-domain ``validation`` and every ``--eval_files`` set).
"""

from __future__ import annotations

import json
import os

from transformers import TrainingArguments

from distill.common.errors import UsageError
from distill.common.io import atomic_write_text

from distill.objective import terms

from .arguments import GlueArguments
from .distillation import needs_attention, run_stages
from .model import check_vocabulary
from .qa import MODEL_COLUMNS, decode
from .squad_metrics import squad_scores
from .tasks import Task


def load_qa_model(path: str, eager: bool = False):
    """``AutoModelForQuestionAnswering`` (a fresh span head on a plain encoder or a student)."""
    from transformers import AutoModelForQuestionAnswering

    kwargs = {"attn_implementation": "eager"} if eager else {}
    try:
        return AutoModelForQuestionAnswering.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as err:
        raise UsageError(f"{path!r} could not be loaded for question answering: {str(err).splitlines()[0]}") from None


def check_qa_run(glue, args, tasks) -> None:
    """The QA-specific settings, before anything loads (one line each)."""
    qa = [t for t in tasks if t.is_qa]
    if not qa:
        return
    for flag in ("augment", "unlabelled_file", "predict_test"):
        if getattr(glue, flag):
            raise UsageError(f"--{flag} is for sentence tasks; {qa[0].display} is extractive QA")
    if getattr(args, "length_groups", 1) > 1:  # the span loss softmaxes over padded positions too: trimming moves it
        raise UsageError(f"--length_groups {args.length_groups} is for sentence tasks ({qa[0].display}'s span loss "
                         "counts every position of a window, padding included): leave it at 1")
    if args.eval_strategy != "no":
        raise UsageError(f"--eval_strategy {args.eval_strategy}: {qa[0].display} is scored after training (EM/F1 "
                         "need every window of an example decoded); leave it at no")
    for name, value, low in (("max_answer_length", glue.max_answer_length, 1), ("n_best_size", glue.n_best_size, 1)):
        if value < low:
            raise UsageError(f"--{name} {value}: give a whole number >= {low}")
    if not glue.teacher:
        return
    for task in qa:
        for stage in run_stages(glue, task):
            for name in stage["weights"]:
                spec = terms.TERMS[name]
                if spec.feature == "logits" and spec.teacher and not spec.softmax_outputs:
                    allowed = [k for k in terms.level_terms(True) if terms.TERMS[k].softmax_outputs or
                               not terms.TERMS[k].teacher or terms.TERMS[k].feature != "logits"]
                    raise UsageError(f"--distill_weights: {name!r} compares raw logits, which a window's padding "
                                     f"would change; for {task.display} use {', '.join(allowed)}")


def qa_attention_needed(glue, task: Task) -> bool:
    return bool(glue.teacher) and any(needs_attention(s["weights"]) for s in run_stages(glue, task))


def finetune_qa(task: Task, data: dict, tokenizer, args: TrainingArguments, glue: GlueArguments) -> dict:
    """Fine-tune ``glue.model`` on the training windows, evaluate every dev set; the cell's result record."""
    from transformers import set_seed

    from .qa import window_collator

    set_seed(args.seed)  # before the model: the new span head is drawn from this seed
    model = load_qa_model(glue.model, eager=qa_attention_needed(glue, task))
    check_vocabulary(tokenizer, model, glue.model)
    shared = dict(processing_class=tokenizer, data_collator=window_collator(tokenizer))
    if glue.teacher:
        from .qa_distill import train_qa_with_teacher

        trainer, trained = train_qa_with_teacher(model, data["train"], shared, args, glue, task)
    else:
        from .trainer import train_plain

        trainer, trained = train_plain(model, data["train"], shared, args)
    record = {
        "task": task.name, **evaluate_qa(trainer, task, data, glue, args.output_dir),
        "checkpoint_selection": None,
        "train": {"examples": trained.examples, "steps": trained.steps, "loss": trained.loss,
                  "runtime_s": round(trained.runtime_s, 2), "device": str(args.device), **trained.record},
    }
    if glue.save_model:
        trainer.save_model(os.path.join(args.output_dir, "model"))
        record["model_dir"] = "model"
    return record


def span_logits(trainer, features):
    """``(start, end)`` logits ``[windows, S]`` of every evaluation window (rows padded past their length)."""
    columns = [c for c in MODEL_COLUMNS if c in features.column_names]
    out = trainer.predict(features.select_columns(columns))
    start, end = out.predictions[:2] if isinstance(out.predictions, tuple) else out.predictions
    return start, end


def evaluate_qa(trainer, task: Task, data: dict, glue: GlueArguments, folder: str) -> dict:
    """EM/F1 per dev set, the task score per set (mean of EM and F1), and the in-domain one as the score.
    Each set's predictions (question id -> text) go to ``predictions_<set>.json`` in the cell folder."""
    metrics, scores = {}, {}
    for split in task.dev_splits:
        start, end = span_logits(trainer, data[split])
        examples = data["examples"][split]
        predictions = decode(examples, data[split], start, end, n_best_size=glue.n_best_size,
                             max_answer_length=glue.max_answer_length, version_2=task.version_2,
                             null_score_diff_threshold=glue.null_score_diff_threshold)
        answers = {qid: a["text"] for qid, a in zip(examples["id"], examples["answers"])}
        metrics[split] = squad_scores(predictions, answers, version_2=task.version_2)
        scores[split] = (metrics[split]["exact_match"] + metrics[split]["f1"]) / 2
        atomic_write_text(os.path.join(folder, f"predictions_{split}.json"),
                          json.dumps(predictions, indent=1, ensure_ascii=False) + "\n")
    return {"dev": metrics, "score_by_split": scores, "score": scores[task.selection_split],
            "selection_split": task.selection_split, "selection_score": scores[task.selection_split]}
