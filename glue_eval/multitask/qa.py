"""Extractive QA as one task of a multi-task run: the single-task QA machinery, task by task.

A QA task's training rows are its windows (:func:`glue_eval.qa.encode_splits`: ``doc_stride`` overlap, the
answer's first and last token, or the classifier token), its head a span head
(:class:`glue_eval.multitask.model.SpanHead`), its loss transformers' QA loss (as a single-task QA cell trains),
or with a teacher the task stage's span terms (:mod:`glue_eval.qa_distill`: ``kl``/``ce`` on the start and end
distributions over real tokens, ``hard_ce`` against the gold start and end), the teacher's span logits cached once
per window (:class:`glue_eval.qa_distill.SpanLogitCache`). Evaluation decodes every window's start and end logits
over each example's windows (:func:`glue_eval.qa.decode`) and scores SQuAD's EM/F1
(:mod:`glue_eval.squad_metrics`), as a single-task QA cell does.
"""

from __future__ import annotations

import copy

import torch

from distill.common.errors import UsageError
from distill.models.loading import Features

from ..qa import MODEL_COLUMNS, decode
from ..squad_metrics import squad_scores
from .combine import soft_and_hard
from .model import span_loss

SPAN_COLUMNS = ("start_positions", "end_positions")


def check_qa_tasks(config, glue) -> None:
    """A QA task's decoding settings and its teacher's terms, before anything loads (one line each)."""
    from distill.objective import terms

    qa = [e for e in config.tasks if e.task.is_qa]
    if not qa:
        return
    for name, value in (("max_answer_length", glue.max_answer_length), ("n_best_size", glue.n_best_size)):
        if value < 1:
            raise UsageError(f"--{name} {value}: give a whole number >= 1")
    if not any(e.teacher for e in qa):
        return
    for name, weight in (config.distill_weights or terms.TASK_WEIGHTS).items():
        spec = terms.TERMS[name]
        if weight and spec.feature == "logits" and spec.teacher and not spec.softmax_outputs:
            raise UsageError(f"distill_weights: {name!r} compares raw logits, which a window's padding would change; "
                             f"task {qa[0].task.name!r} is extractive QA: use kl, ce or hard_ce")


def qa_run_fields(task, data: dict, glue) -> dict:
    """The fields of a QA task's :class:`glue_eval.multitask.train.TaskRun` from its encoded windows (``data``:
    :func:`glue_eval.encode.tokenize`): training windows with ``row``, evaluation windows, examples, decoding."""
    train = data["train"].add_column("row", list(range(len(data["train"]))))
    decoding = {"n_best_size": glue.n_best_size, "max_answer_length": glue.max_answer_length,
                "version_2": task.version_2, "null_score_diff_threshold": glue.null_score_diff_threshold}
    return {"train": train, "dev": {s: data[s] for s in task.dev_splits}, "examples": dict(data["examples"]),
            "decoding": decoding}


def attach_qa_teacher(run, path: str, weights: dict, glue, args, model, collate) -> None:
    """The QA teacher of ``run``: its span terms and ``hard_ce`` as ``run.soft``/``run.hard`` and its span logits
    over every training window as ``run.cache``."""
    from ..qa_distill import SpanLogitCache, load_qa_teacher, qa_stage_objectives
    from ..trainer import teacher_autocast

    teacher = load_qa_teacher(path, model.encoder, eager=False)
    student = copy.deepcopy(model.encoder.config)
    student.num_labels = 2
    _, run.soft, run.hard = qa_stage_objectives(weights, glue, student, teacher)
    if run.soft is not None:
        run.cache = SpanLogitCache.build(teacher.to(args.device), run.train, collate,
                                         batch_size=args.per_device_eval_batch_size, device=args.device,
                                         autocast=lambda: teacher_autocast(args))
        run.soft.to(args.device)


def span_run_loss(model, run, batch: dict) -> tuple[torch.Tensor, dict]:
    """(loss, unweighted terms) of one batch of QA windows (already on the device): transformers' QA loss, or
    the teacher's span terms and ``hard_ce`` on the start and end rows (as
    :meth:`glue_eval.qa_distill.QADistillationTrainer.distillation_loss` computes them)."""
    out = model(task=run.name, **{k: batch[k] for k in MODEL_COLUMNS if k in batch})
    starts, ends = batch["start_positions"], batch["end_positions"]
    if run.soft is None and run.hard is None:
        loss = span_loss(out.start_logits, out.end_logits, starts, ends)
        return loss, {"task": loss.detach()}
    from ..qa_distill import span_rows

    ids, mask = batch["input_ids"], batch["attention_mask"]
    rows = {"input_ids": torch.cat((ids, ids)), "attention_mask": torch.cat((mask, mask)),
            "labels": torch.cat((starts, ends))}
    student = Features(logits=span_rows(torch.stack((out.start_logits, out.end_logits), dim=1), mask))
    return soft_and_hard(run, student, lambda: Features(logits=span_rows(run.cache.features(batch["row"], mask).logits,
                                                                          mask)), rows)


@torch.no_grad()
def span_logits(model, name: str, windows, collate, batch_size: int, device) -> tuple[list, list]:
    """Every evaluation window's start and end logits over its real tokens (lists of ``[S_i]`` arrays)."""
    rows = windows.select_columns([c for c in MODEL_COLUMNS if c in windows.column_names])
    starts, ends = [], []
    for first in range(0, len(rows), batch_size):
        batch = collate([rows[i] for i in range(first, min(first + batch_size, len(rows)))])
        out = model(task=name, **{k: batch[k].to(device) for k in MODEL_COLUMNS if k in batch})
        real = batch["attention_mask"].bool()
        for i in range(real.shape[0]):  # the real tokens, whichever side the tokenizer pads
            starts.append(out.start_logits[i].float().cpu()[real[i]].numpy())
            ends.append(out.end_logits[i].float().cpu()[real[i]].numpy())
    return starts, ends


def evaluate_span_task(model, run, collate, batch_size: int, device) -> dict:
    """``{"dev": {split: EM/F1}, "score_by_split", "score", "predictions"}`` (fractions): each split's windows
    decoded per example, scored with SQuAD's EM/F1; a split's score is the mean of EM and F1, the task's score its
    selection split's (as a single-task QA cell)."""
    dev, scores, predictions = {}, {}, {}
    for split, windows in run.dev.items():
        starts, ends = span_logits(model, run.name, windows, collate, batch_size, device)
        examples = run.examples[split]
        predictions[split] = decode(examples, windows, starts, ends, **run.decoding)
        answers = {qid: a["text"] for qid, a in zip(examples["id"], examples["answers"])}
        dev[split] = squad_scores(predictions[split], answers, version_2=run.decoding["version_2"])
        scores[split] = (dev[split]["exact_match"] + dev[split]["f1"]) / 2
    return {"dev": dev, "score_by_split": scores, "score": scores[run.task.selection_split],
            "predictions": predictions}
