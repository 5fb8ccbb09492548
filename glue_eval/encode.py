"""The pipeline's first stage: a task's rows as token ids, at the length the models hold; for a --teacher
run, the training set with its augmented and unlabelled rows."""

from __future__ import annotations

import functools
import os

from transformers import TrainingArguments

from distill.common.errors import UsageError
from distill.models.loading import TOKENIZER_FILES

from .arguments import GlueArguments
from .tasks import Task


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


def tokenize(task: Task, splits: dict, tokenizer, max_seq_length: int, doc_stride: int = 128) -> dict:
    """Split -> dataset of ``input_ids``/``attention_mask``(/``token_type_ids``), ``label``, ``idx``
    (and, on ``train`` only, the task's text fields). Extractive QA: windows of ``doc_stride`` overlap
    (:func:`glue_eval.qa.encode_splits`)."""
    if task.is_qa:
        from .qa import encode_splits

        return encode_splits(task, splits, tokenizer, max_seq_length, doc_stride)

    def encode(batch):
        return tokenizer(*[batch[f] for f in task.text_fields], truncation=True, max_length=max_seq_length)

    # The train split keeps its texts: --augment makes its variants from them.
    return {name: ds.map(encode, batched=True, remove_columns=[] if name == "train" else list(task.text_fields),
                         desc=f"tokenize {name}")
            for name, ds in splits.items()}


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
