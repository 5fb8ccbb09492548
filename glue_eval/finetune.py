"""One fine-tuning run with transformers' ``Trainer``: train split in, dev metrics (and test predictions) out.

Arguments are ``TrainingArguments`` (the names users know: ``--learning_rate``,
``--per_device_train_batch_size``, ``--fp16`` ...) with a few defaults changed
for grids, plus :class:`GlueArguments` for what Trainer has no name for.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import TrainingArguments

from distill.common.errors import UsageError
from distill.models.loading import TOKENIZER_FILES

# Trainer and the Auto classes are imported where used: importing Trainer takes seconds, and a
# bad argument should be reported before that.
from distill.objective import terms
from distill.objective.settings import TaskObjectiveSettings

from .metrics import compute_metrics, task_score
from .tasks import Task


@dataclass
class GlueArguments(TaskObjectiveSettings):
    """What the run needs beyond Trainer's own arguments; the objective settings the task stage shares with
    distill-train (``--temperature``, ``--layer_map``) are inherited from their one declaration."""

    model: str | None = field(default=None, metadata={"help": "Model folder or hub id to fine-tune."})
    task: str | None = field(default=None, metadata={
        "help": "CoLA, SST-2, MRPC, STS-B, QQP, MNLI, QNLI, RTE, WNLI, 'all', a comma list, or a task spec .json."})
    data_dir: str | None = field(default=None, metadata={
        "help": "Local GLUE folder (original TSV download or hub-layout parquet/CSV). Default: the hub, nyu-mll/glue."})
    grid: str | None = field(default=None, metadata={
        "help": "Grid spec JSON (tasks x learning rates x batch sizes x seeds), or 'default' for the seed report's."})
    tokenizer: str | None = field(default=None, metadata={"help": "Tokenizer folder or id, if the model has none."})
    max_seq_length: int = field(default=128, metadata={"help": "Longer inputs are truncated (tokens)."})
    predict_test: bool = field(default=False, metadata={
        "help": "Also write test-set predictions in GLUE's submission format (<TASK>.tsv)."})
    save_model: bool = field(default=False, metadata={
        "help": "Save the fine-tuned model and tokenizer in <cell>/model (e.g. a teacher for --teacher)."})
    skip_bad_rows: bool = field(default=False, metadata={
        "help": "Drop TSV rows with the wrong column count (counted on stderr) instead of stopping."})
    teacher: str | None = field(default=None, metadata={
        "help": "A fine-tuned teacher folder: adds distillation terms while fine-tuning (TinyBERT's 2nd stage)."})
    distill_weights: str = field(default=json.dumps(terms.TASK_WEIGHTS), metadata={
        "help": f"JSON weights of the --teacher terms: {terms.term_list(terms.level_terms(sequence_level=True))}."})
    student_layers: str | None = field(default=None, metadata={
        "help": "Teacher layers the student was built from, e.g. 1,5,8,12: the layer map of "
                f"{'/'.join(terms.select(layers='map', sequence_level=True))}."})
    precision: str = field(default="auto", metadata={
        "choices": ["auto", "fp32", "bf16", "fp16"],
        "help": "auto (default): bf16 on a CPU with avx512_bf16/amx_bf16 or a GPU with native bf16, fp16 on an older "
                "GPU, fp32 on other CPUs (where bf16 is emulated and slow); or fp32, bf16, fp16. Sets Trainer's "
                "bf16/fp16 flags; an explicit --bf16 or --fp16 stands."})
    stages: str | None = field(default=None, metadata={
        "help": "--teacher stages run in order (TinyBERT: intermediate terms, then prediction terms), JSON or a .json "
                "file: '[{\"weights\": {\"hid_mse\": 1, \"att_mse\": 1}, \"epochs\": 10}, "
                "{\"weights\": {\"kl\": 1}, \"epochs\": 3}]'; replaces --distill_weights."})
    augment: int = field(default=0, metadata={
        "help": "--teacher: N variants of every training example with words replaced (TinyBERT), labelled by the "
                "teacher; hard_ce counts on the original examples only."})
    augment_model: str | None = field(default=None, metadata={
        "help": "Masked-LM folder giving --augment's candidate words (default: the teacher's own MLM head if it "
                "has one, else nearest neighbours in the teacher's input embeddings)."})
    augment_probability: float = field(default=0.4, metadata={"help": "Chance that --augment replaces a word."})
    augment_candidates: int = field(default=15, metadata={"help": "Candidates per word for --augment (top K)."})
    unlabelled_file: str | None = field(default=None, metadata={
        "help": "--teacher: extra in-domain text the teacher labels (.txt one example per line, a tab between the "
                "texts of a pair; or a table with the task's text columns); only soft terms count on it."})
    teacher_cache: bool = field(default=True, metadata={
        "help": "Compute the teacher's outputs once per training example (logits always; representations within "
                "--teacher_cache_mb)."})
    teacher_cache_mb: float = field(default=2048, metadata={
        "help": "Largest float32 size (MiB) of cached teacher representations; over it they are recomputed."})


@dataclass
class GlueTrainingArguments(TrainingArguments):
    """TrainingArguments with grid-friendly defaults; every Trainer flag still works."""

    # A grid of 162 runs must not leave 162 sets of checkpoints behind; --save_model keeps the final one.
    save_strategy: str = field(default="no", metadata={"help": "Checkpoint strategy (no, steps, epoch, best)."})
    per_device_train_batch_size: int = field(default=32, metadata={"help": "Batch size per device for training."})
    per_device_eval_batch_size: int = field(default=128, metadata={"help": "Batch size per device for evaluation."})
    logging_steps: float = field(default=50, metadata={"help": "Log every N update steps."})


def check_model_dir(model: str, tokenizer: str | None) -> None:
    """A local model folder must hold a config and, unless --tokenizer is given, a tokenizer."""
    if os.path.isdir(model):
        if not os.path.isfile(os.path.join(model, "config.json")):
            raise UsageError(f"model folder {model!r} has no config.json: give a transformers model folder")
        if tokenizer is None and not any(os.path.isfile(os.path.join(model, f)) for f in TOKENIZER_FILES):
            raise UsageError(
                f"model folder {model!r} has no tokenizer (no tokenizer.json, vocab.txt, ...): save it there with "
                "tokenizer.save_pretrained(folder), or pass --tokenizer NAME_OR_FOLDER"
            )
    elif model.startswith((".", "/", "~")) or os.path.exists(model):
        raise UsageError(f"model {model!r} does not exist: give a model folder or a hub id")


def load_tokenizer(model: str, tokenizer: str | None):
    from transformers import AutoTokenizer

    name = tokenizer or model
    try:
        return AutoTokenizer.from_pretrained(name)
    except Exception as err:  # noqa: BLE001 - any failure here is the user's folder or id
        raise UsageError(f"could not load a tokenizer from {name!r}: {type(err).__name__}: {err}") from None


def sequence_length(glue: GlueArguments, tokenizer=None) -> tuple[int, str | None]:
    """The length inputs are cut at: ``max_seq_length``, or less where the model, the teacher or the tokenizer
    holds fewer positions, with the note that says so (else None). Like transformers' run_glue, which takes
    ``min(max_seq_length, tokenizer.model_max_length)``; here also the position tables of the models, since a
    longer input would index past one mid-run. The cell's settings keep the length asked for, so a grid resumes
    as before. A model whose config cannot be read here (a hub id offline) is left to its loader's own error."""
    limits = list(_position_limits(glue.model, glue.teacher))
    size = getattr(tokenizer, "model_max_length", None)
    if isinstance(size, int) and 0 < size < 10 ** 6:  # transformers' "no limit" is a huge number
        limits.append((size, "the tokenizer of", glue.tokenizer or glue.model))
    if not limits or glue.max_seq_length <= min(limits)[0]:
        return glue.max_seq_length, None
    limit, flag, path = min(limits)
    return limit, (f"max_seq_length {glue.max_seq_length} is longer than {flag} {path} holds ({limit} positions): "
                   f"inputs are cut at {limit} tokens")


@functools.lru_cache(maxsize=8)
def _position_limits(model: str, teacher: str | None) -> tuple:
    from transformers import AutoConfig

    from distill.models.families import max_positions

    limits = []
    for flag, path in (("--model", model), ("--teacher", teacher)):
        if not path:
            continue
        try:
            config = AutoConfig.from_pretrained(path)
        except (OSError, ValueError):
            continue
        try:
            limit = max_positions(config)
        except UsageError:  # a model type the distillation side does not know: its table as it is
            limit = getattr(config, "max_position_embeddings", None)
        if isinstance(limit, int) and limit > 0:
            limits.append((limit, flag, path))
    return tuple(limits)


def tokenize(task: Task, splits: dict, tokenizer, max_seq_length: int) -> dict:
    """Split -> dataset of ``input_ids``/``attention_mask``(/``token_type_ids``), ``label``, ``idx``
    (and, on ``train`` only, the task's text fields)."""

    def encode(batch):
        return tokenizer(*[batch[f] for f in task.text_fields], truncation=True, max_length=max_seq_length)

    # The train split keeps its texts: --augment makes its variants from them.
    return {name: ds.map(encode, batched=True, remove_columns=[] if name == "train" else list(task.text_fields),
                         desc=f"tokenize {name}")
            for name, ds in splits.items()}


def load_classifier(path: str, task: Task, eager: bool = False):
    """``AutoModelForSequenceClassification`` with the task's head (a fresh head if the checkpoint has another).

    ``eager=True`` selects eager attention, the only kind that returns attention probabilities.
    """
    from transformers import AutoConfig, AutoModelForSequenceClassification

    labels = task.labels or ("score",)
    config = AutoConfig.from_pretrained(
        path, num_labels=task.num_labels, id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
        problem_type="regression" if task.is_regression else "single_label_classification",
    )
    # A model fine-tuned on another task (MNLI -> RTE) gets a new head rather than an error.
    kwargs = {"attn_implementation": "eager"} if eager else {}
    return AutoModelForSequenceClassification.from_pretrained(path, config=config, ignore_mismatched_sizes=True,
                                                              **kwargs)


def check_vocabulary(tokenizer, model, name: str) -> None:
    """Token ids past the embedding table fail deep inside torch; say which folder disagrees instead."""
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise UsageError(
            f"the tokenizer has {len(tokenizer)} tokens but {name!r} has {rows} embedding rows: "
            "use the tokenizer the model was trained with"
        )


def _logits(predictions):
    return predictions[0] if isinstance(predictions, tuple) else predictions


def finetune(task: Task, data: dict, tokenizer, args: TrainingArguments, glue: GlueArguments) -> dict:
    """Fine-tune ``glue.model`` on ``data["train"]``, evaluate on every dev split.

    data: split -> tokenized dataset (:func:`tokenize`).
    args: the cell's TrainingArguments (learning rate, batch, seed, ``output_dir`` = the cell folder).
    Returns the result record: metrics per dev split (fractions), the task score per split and
    overall, and the split model selection uses. Writes test predictions and the model only if asked.
    """
    from transformers import DataCollatorWithPadding, set_seed

    eager = False
    if glue.teacher:
        from .distillation import needs_attention, run_stages

        eager = any(needs_attention(stage["weights"]) for stage in run_stages(glue, task))
    set_seed(args.seed)  # before the model: the new classifier head is drawn from this seed
    model = load_classifier(glue.model, task, eager=eager)
    check_vocabulary(tokenizer, model, glue.model)
    strip = ["idx", *task.text_fields]
    train = data["train"].remove_columns(strip)
    dev = {s: data[s].remove_columns(["idx"]) for s in task.dev_splits}
    if args.load_best_model_at_end and len(dev) > 1:
        metric = (args.metric_for_best_model or task.metrics[0]).removeprefix("eval_")
        if not any(metric.startswith(s) for s in dev):
            # Checkpoint selection over several dev splits must name one: the task's selection split
            # (MNLI: matched), never a pool of both, so mismatched stays a check on the choice.
            args.metric_for_best_model = f"eval_{task.selection_split}_{metric}"
    shared = dict(
        args=args,
        eval_dataset=dev if len(dev) > 1 else next(iter(dev.values())),
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=lambda p: compute_metrics(task, _logits(p.predictions), p.label_ids),
    )
    extra_record = {}
    if glue.teacher:
        from .distillation import train_with_teacher

        train, extra_record = teacher_train_set(task, data, tokenizer, args, glue)
        trainer, stages, cache = train_with_teacher(model, train, {k: v for k, v in shared.items() if k != "args"},
                                                    args, glue, task)
        train_out = _TrainOutput(global_step=sum(s["steps"] for s in stages), training_loss=stages[-1]["loss"],
                                 metrics={"train_runtime": sum(s["runtime_s"] for s in stages)})
        extra_record.update(stages=stages, teacher_cache=cache)
    else:
        from .trainer import GlueTrainer

        trainer = GlueTrainer(model=model, train_dataset=train, **shared)
        train_out = trainer.train()
    metrics = {}
    for split, ds in dev.items():
        out = trainer.predict(ds, metric_key_prefix=f"eval_{split}")
        metrics[split] = compute_metrics(task, _logits(out.predictions), out.label_ids)
    scores = {split: task_score(m) for split, m in metrics.items()}
    record = {
        "task": task.name,
        "dev": metrics,
        "score_by_split": scores,
        # The task's one number for the GLUE average: MNLI counts m and mm by their mean.
        "score": float(np.mean(list(scores.values()))),
        "selection_split": task.selection_split,
        "selection_score": scores[task.selection_split],
        # --load_best_model_at_end picks the checkpoint on dev too: the report says so.
        "checkpoint_selection": args.metric_for_best_model if args.load_best_model_at_end else None,
        "train": {
            "examples": len(train),
            "steps": train_out.global_step,
            "loss": train_out.training_loss,
            "runtime_s": round(train_out.metrics.get("train_runtime", 0.0), 2),
            "device": str(args.device),
            **extra_record,
        },
    }
    if glue.predict_test:
        record["test_predictions"] = write_submission(trainer, task, data, os.path.join(args.output_dir, "submission"))
    if glue.save_model:
        trainer.save_model(os.path.join(args.output_dir, "model"))
        record["model_dir"] = "model"
    return record


@dataclass
class _TrainOutput:
    """What the record reads of ``Trainer.train()``'s result, summed over the stages of a teacher run."""

    global_step: int
    training_loss: float
    metrics: dict


def teacher_train_set(task: Task, data: dict, tokenizer, args: TrainingArguments, glue: GlueArguments):
    """The training set of a --teacher run: original rows, their --augment variants and --unlabelled_file rows.

    Returns (dataset with ``row`` = 0..N-1 and ``labelled`` = 1 on original rows only, a record of its parts).
    Augmented and unlabelled rows keep a placeholder label (their origin's, or 0) that no loss reads: the
    teacher labels them, and hard_ce skips every row with ``labelled`` = 0.
    """
    import datasets

    original = data["train"]
    parts = [original.remove_columns([*task.text_fields, "idx"])]
    flags = [[1] * len(original)]
    record = {"original_examples": len(original)}
    if glue.augment:
        from .augment import (
            AugmentSettings,
            augment_texts,
            describe_source,
            load_source,
        )

        columns = {f: list(original[f]) for f in task.text_fields}
        settings = AugmentSettings(glue.augment, args.seed, glue.augment_probability, glue.augment_candidates)
        kind, folder, name = describe_source(glue.teacher, glue.augment_model)
        cache_dir = os.path.join(os.path.dirname(os.path.abspath(args.output_dir)), "augmented")
        variants, path, hit = augment_texts(columns, settings, cache_dir, name,
                                            lambda: load_source(kind, folder, tokenizer, args.device))
        labels = original["label"]
        rows = {f: variants[f] for f in task.text_fields} | {"label": [labels[i] for i in variants["origin"]]}
        parts.append(_encode_rows(task, rows, tokenizer, sequence_length(glue, tokenizer)[0],
                                  original.features["label"]))
        flags.append([0] * len(variants["origin"]))
        record["augmented"] = {"examples": len(variants["origin"]), "source": kind, "cache": os.path.basename(path),
                               "cached": hit}
    if glue.unlabelled_file:
        from .data import load_unlabelled

        rows = load_unlabelled(task, glue.unlabelled_file)
        n = len(rows[task.text_fields[0]])
        rows["label"] = [0.0 if task.is_regression else 0] * n
        parts.append(_encode_rows(task, rows, tokenizer, sequence_length(glue, tokenizer)[0],
                                  original.features["label"]))
        flags.append([0] * n)
        record["unlabelled_examples"] = n
    train = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    labelled = [x for f in flags for x in f]
    train = train.add_column("labelled", labelled).add_column("row", list(range(len(train))))
    return train, record


def _encode_rows(task: Task, rows: dict, tokenizer, max_seq_length: int, label_feature):
    import datasets

    features = datasets.Features({**{f: datasets.Value("string") for f in task.text_fields}, "label": label_feature})
    ds = datasets.Dataset.from_dict(rows, features=features)
    return tokenize(task, {"extra": ds}, tokenizer, max_seq_length)["extra"]  # not "train": texts are dropped


def write_submission(trainer, task: Task, data: dict, folder: str) -> list[str]:
    """GLUE server files: ``index<TAB>prediction`` per test row, class names as GLUE's TSVs spell them.

    With MNLI, ``data`` may also hold GLUE's diagnostic set: it is predicted with the same model into AX.tsv.
    """
    from distill.common.io import atomic_write_text

    from .tasks import DIAGNOSTIC_OF, DIAGNOSTIC_SPLIT

    written = []
    files = dict(task.test_splits)
    if DIAGNOSTIC_SPLIT in data:
        files[DIAGNOSTIC_SPLIT] = DIAGNOSTIC_OF[task.name].test_splits["test"]
    for split, filename in files.items():
        ds = data[split]
        index = ds["idx"]
        out = trainer.predict(ds.remove_columns(["idx", "label"]))
        logits = _logits(out.predictions)
        if task.is_regression:
            preds = [f"{x:.3f}" for x in np.asarray(logits).reshape(len(ds), -1)[:, 0]]
        else:
            preds = [task.tsv_labels[i] for i in np.asarray(logits).argmax(-1)]
        lines = ["index\tprediction"] + [f"{i}\t{p}" for i, p in zip(index, preds)]
        atomic_write_text(os.path.join(folder, filename), "\n".join(lines) + "\n")
        written.append(os.path.join("submission", filename))
    return written


def apply_precision(glue: GlueArguments, args: TrainingArguments) -> tuple[TrainingArguments, str | None]:
    """``--precision`` onto Trainer's ``bf16``/``fp16`` flags; returns the arguments and the line to print.

    ``auto`` asks :func:`distill.common.hardware.resolve_auto_precision` (the one decision the
    distillation engine uses too) about the device the Trainer will use. Trainer's own
    ``--bf16``/``--fp16`` stand when given; with an explicit ``--precision`` they must agree.
    """
    import dataclasses

    from distill.common.hardware import choose_precision

    given = "bf16" if args.bf16 else "fp16" if args.fp16 else None
    if given:
        if glue.precision not in ("auto", given):
            raise UsageError(f"--precision {glue.precision} disagrees with Trainer's --{given}: give one of them")
        return args, None
    device = "cuda" if torch.cuda.is_available() and not args.use_cpu else "cpu"
    chosen, _, line = choose_precision(glue.precision, "O2", device)
    if chosen not in ("fp32", "bf16", "fp16"):
        raise UsageError(f"--precision {glue.precision!r}: choose auto, fp32, bf16 or fp16")
    if chosen == "fp32":
        return args, line
    # replace() re-runs TrainingArguments' own checks and derives its mixed-precision setting from the flag;
    # on a CPU those checks want use_cpu with bf16, which is where the run goes anyway.
    changes = {"bf16": chosen == "bf16", "fp16": chosen == "fp16", **({"use_cpu": True} if device == "cpu" else {})}
    try:
        return dataclasses.replace(args, **changes), line
    except ValueError as err:
        raise UsageError(f"--precision {glue.precision} -> {chosen}: {str(err).splitlines()[0]}") from None


def precision_check(args: TrainingArguments) -> None:
    """fp16 is a CUDA mode: on a CPU it crawls or fails deep inside torch, so say so up front."""
    if args.fp16 and not torch.cuda.is_available():
        raise UsageError("--fp16 needs a CUDA GPU and none is visible: drop it, or on a CPU use --bf16 --use_cpu")


def file_digest(path: str) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def task_settings(task: Task) -> dict | None:
    """What defines a local task for cell reuse: its files by content, its labels, text columns and metrics (a spec
    pointing at other or edited data must not reuse cells; the same data under another path may). None for GLUE
    tasks, whose data is ``data_dir``."""
    if not task.files:
        return None
    return {
        "files": {split: file_digest(path) for split, path in task.files.items() if os.path.isfile(path)},
        "labels": list(task.labels) if task.labels else None, "text_fields": list(task.text_fields),
        "metrics": list(task.metrics),
    }


def describe(glue: GlueArguments, args: TrainingArguments, task_data: dict | None = None) -> dict:
    """The settings that define a cell; a finished cell is reused only if these match. ``task_data``:
    :func:`task_settings` of the cell's task."""
    weights = json.loads(glue.distill_weights) if glue.teacher else None
    return {
        "task_data": task_data,
        "model": glue.model,
        "tokenizer": glue.tokenizer,
        "data_dir": glue.data_dir,
        "max_seq_length": glue.max_seq_length,
        "learning_rate": args.learning_rate,
        "per_device_train_batch_size": args.per_device_train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "num_train_epochs": args.num_train_epochs,
        "max_steps": args.max_steps,
        "warmup_steps": args.warmup_steps,
        "weight_decay": args.weight_decay,
        "lr_scheduler_type": str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)),
        "seed": args.seed,
        "fp16": args.fp16,
        "bf16": args.bf16,
        "teacher": glue.teacher,
        "distill_weights": weights,
        "temperature": glue.temperature if glue.teacher else None,
        "student_layers": glue.student_layers if glue.teacher else None,
        **task_stage_settings(glue),
    }


def task_stage_settings(glue: GlueArguments) -> dict:
    """The --teacher run's data and stages as cell settings (files by content); empty without them, so cells
    recorded before these options existed still match."""
    if not glue.teacher:
        return {}
    out = {}
    if glue.stages:
        from .distillation import parse_stages

        out["stages"] = parse_stages(glue.stages)
    if glue.augment:
        from .augment import model_digest

        out["augment"] = {"variants": glue.augment, "probability": glue.augment_probability,
                          "candidates": glue.augment_candidates,
                          "model": model_digest(glue.augment_model) if glue.augment_model else None}
    if glue.unlabelled_file:
        out["unlabelled_file"] = file_digest(glue.unlabelled_file)
    return out
