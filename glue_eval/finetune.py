"""One grid cell as a pipeline: the encoded task in, its result record out.

encode (:mod:`glue_eval.encode`, done once per task by the grid) -> build the model (:mod:`glue_eval.model`)
-> train, plain (:func:`glue_eval.trainer.train_plain`) or with the teacher's stages
(:mod:`glue_eval.distillation`) -> evaluate (:mod:`glue_eval.evaluate`) -> write (the grid writes the record).
Each stage is handed what it needs once and returns what the next one needs; none calls back here.
"""

from __future__ import annotations

import os

from transformers import TrainingArguments

from .arguments import GlueArguments
from .evaluate import evaluate, logits_of, write_submission
from .metrics import compute_metrics
from .model import check_vocabulary, load_classifier
from .tasks import Task


def finetune(task: Task, data: dict, tokenizer, args: TrainingArguments, glue: GlueArguments) -> dict:
    """Fine-tune ``glue.model`` on ``data["train"]``, evaluate on every dev split; the result record.

    data: split -> tokenized dataset (:func:`glue_eval.encode.tokenize`).
    args: the cell's TrainingArguments (learning rate, batch, seed, ``output_dir`` = the cell folder).
    Writes test predictions and the model only if asked.
    """
    from transformers import DataCollatorWithPadding, set_seed

    from .distillation import attention_needed

    if task.is_qa:  # spans, not labels: the same stages with QA's model and scoring
        from .qa_finetune import finetune_qa

        return finetune_qa(task, data, tokenizer, args, glue)
    set_seed(args.seed)  # before the model: the new classifier head is drawn from this seed
    model = load_classifier(glue.model, task, eager=attention_needed(glue, task))
    check_vocabulary(tokenizer, model, glue.model)
    dev = {s: data[s].remove_columns(["idx"]) for s in task.dev_splits}
    select_on_one_split(args, task, dev)
    shared = dict(  # what every trainer of the cell is given
        eval_dataset=dev if len(dev) > 1 else next(iter(dev.values())), processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=lambda p: compute_metrics(task, logits_of(p.predictions), p.label_ids))
    if glue.teacher:
        from .distillation import train_with_teacher

        trainer, trained = train_with_teacher(model, data, tokenizer, shared, args, glue, task)
    else:
        from .trainer import (
            train_plain,  # Trainer takes seconds to import: after the arguments are checked
        )

        trainer, trained = train_plain(model, data["train"].remove_columns(["idx", *task.text_fields]), shared, args)
    record = {
        "task": task.name, **evaluate(trainer, task, dev),
        # --load_best_model_at_end picks the checkpoint on dev too: the report says so.
        "checkpoint_selection": args.metric_for_best_model if args.load_best_model_at_end else None,
        "train": {"examples": trained.examples, "steps": trained.steps, "loss": trained.loss,
                  "runtime_s": round(trained.runtime_s, 2), "device": str(args.device), **trained.record},
    }
    if glue.predict_test:
        record["test_predictions"] = write_submission(trainer, task, data, os.path.join(args.output_dir, "submission"))
    if glue.save_model:
        trainer.save_model(os.path.join(args.output_dir, "model"))
        record["model_dir"] = "model"
    return record


def select_on_one_split(args: TrainingArguments, task: Task, dev: dict) -> None:
    """Checkpoint selection over several dev splits must name one: the task's selection split (MNLI:
    matched), never a pool of both, so mismatched stays a check on the choice."""
    if args.load_best_model_at_end and len(dev) > 1:
        metric = (args.metric_for_best_model or task.metrics[0]).removeprefix("eval_")
        if not any(metric.startswith(s) for s in dev):
            args.metric_for_best_model = f"eval_{task.selection_split}_{metric}"
