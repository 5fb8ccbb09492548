"""The task registry: the nine GLUE tasks, and local tasks described by a small JSON spec.

One :class:`Task` says everything the rest of the package needs: text fields and
label list (in the hub's ``nyu-mll/glue`` ClassLabel order, which is GLUE's),
metrics, splits, how the original GLUE download lays out its TSV files, and the
file names the GLUE server expects for test predictions.

Split names are the hub's everywhere (``train``, ``validation``,
``validation_matched``, ``test_mismatched`` ...); :data:`TSV_FILES` maps them to
the original file names (``dev.tsv``, ``dev_matched.tsv`` ...).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from distill.common.errors import UsageError
from distill.common.io import read_json_object

from .metrics import METRICS
from .qa_tasks import EXTRACTIVE_QA, SQUAD_FILES, qa_spec_fields, squad_task_fields

TSV_FILES = {
    "train": "train.tsv",
    "validation": "dev.tsv",
    "validation_matched": "dev_matched.tsv",
    "validation_mismatched": "dev_mismatched.tsv",
    "test": "test.tsv",
    "test_matched": "test_matched.tsv",
    "test_mismatched": "test_mismatched.tsv",
}


@dataclass(frozen=True)
class TsvLayout:
    """Columns of one original GLUE TSV file.

    ``columns`` is set only for files without a header line (CoLA's train/dev);
    otherwise the header names the columns and its length is the column count
    every row must have. ``text`` lists the text columns in the task's
    ``text_fields`` order; ``label`` is None in test files, ``index`` None in
    files whose row number is the index.
    """

    text: tuple[str, ...]
    label: str | None = None
    index: str | None = None
    columns: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Task:
    """One task. ``labels`` is None for regression (scores are floats).

    name: the hub config name (``"sst2"``), the key everywhere in this package.
    display: GLUE's spelling (``"SST-2"``); also the original folder name.
    text_fields: one or two column names as the hub spells them.
    labels: class names, index = label id (the hub's ClassLabel order).
    tsv_labels: how the original TSV spells each class, same order (also what
        the GLUE server wants in submission files).
    metrics: metric names from :data:`glue_eval.metrics.METRICS`.
    dev_splits: evaluation splits; the first is the one model selection uses.
    test_splits: test split -> submission file name.
    files: for local tasks only: split -> file path.
    """

    name: str
    display: str
    text_fields: tuple[str, ...]
    labels: tuple[str, ...] | None
    metrics: tuple[str, ...]
    tsv_labels: tuple[str, ...] | None = None
    dev_splits: tuple[str, ...] = ("validation",)
    test_splits: dict = field(default_factory=lambda: {"test": None})
    tsv: TsvLayout | None = None
    tsv_test: TsvLayout | None = None
    files: dict | None = None
    glue: bool = True
    kind: str = "classification"  # or "extractive_qa" (glue_eval.qa_tasks): spans, not labels
    version_2: bool = False  # extractive QA: questions may have no answer (SQuAD v2)

    @property
    def is_qa(self) -> bool:
        return self.kind == EXTRACTIVE_QA

    @property
    def is_regression(self) -> bool:
        return self.labels is None and not self.is_qa

    @property
    def num_labels(self) -> int:
        return 1 if self.labels is None else len(self.labels)

    @property
    def selection_split(self) -> str:
        """The dev split that picks the best run (MNLI: matched; mismatched stays a check)."""
        return self.dev_splits[0]


def _pair(a, b, **kw):
    return TsvLayout(text=(a, b), **kw)


GLUE_TASKS: dict[str, Task] = {
    t.name: t
    for t in [
        # CoLA train/dev have no header: source, label, original label ('*' or empty), sentence.
        Task("cola", "CoLA", ("sentence",), ("unacceptable", "acceptable"), ("matthews_correlation",),
             tsv_labels=("0", "1"), test_splits={"test": "CoLA.tsv"},
             tsv=TsvLayout(text=("sentence",), label="label",
                           columns=("source", "label", "original_label", "sentence")),
             tsv_test=TsvLayout(text=("sentence",), index="index")),
        Task("sst2", "SST-2", ("sentence",), ("negative", "positive"), ("accuracy",),
             tsv_labels=("0", "1"), test_splits={"test": "SST-2.tsv"},
             tsv=TsvLayout(text=("sentence",), label="label"),
             tsv_test=TsvLayout(text=("sentence",), index="index")),
        Task("mrpc", "MRPC", ("sentence1", "sentence2"), ("not_equivalent", "equivalent"), ("f1", "accuracy"),
             tsv_labels=("0", "1"), test_splits={"test": "MRPC.tsv"},
             tsv=_pair("#1 String", "#2 String", label="Quality"),
             tsv_test=_pair("#1 String", "#2 String", index="index")),
        Task("stsb", "STS-B", ("sentence1", "sentence2"), None, ("pearson", "spearmanr"),
             test_splits={"test": "STS-B.tsv"},
             tsv=_pair("sentence1", "sentence2", label="score"),
             tsv_test=_pair("sentence1", "sentence2", index="index")),
        Task("qqp", "QQP", ("question1", "question2"), ("not_duplicate", "duplicate"), ("f1", "accuracy"),
             tsv_labels=("0", "1"), test_splits={"test": "QQP.tsv"},
             tsv=_pair("question1", "question2", label="is_duplicate"),
             tsv_test=_pair("question1", "question2", index="id")),
        Task("mnli", "MNLI", ("premise", "hypothesis"), ("entailment", "neutral", "contradiction"), ("accuracy",),
             tsv_labels=("entailment", "neutral", "contradiction"),
             dev_splits=("validation_matched", "validation_mismatched"),
             test_splits={"test_matched": "MNLI-m.tsv", "test_mismatched": "MNLI-mm.tsv"},
             tsv=_pair("sentence1", "sentence2", label="gold_label"),
             tsv_test=_pair("sentence1", "sentence2", index="index")),
        Task("qnli", "QNLI", ("question", "sentence"), ("entailment", "not_entailment"), ("accuracy",),
             tsv_labels=("entailment", "not_entailment"), test_splits={"test": "QNLI.tsv"},
             tsv=_pair("question", "sentence", label="label"),
             tsv_test=_pair("question", "sentence", index="index")),
        Task("rte", "RTE", ("sentence1", "sentence2"), ("entailment", "not_entailment"), ("accuracy",),
             tsv_labels=("entailment", "not_entailment"), test_splits={"test": "RTE.tsv"},
             tsv=_pair("sentence1", "sentence2", label="label"),
             tsv_test=_pair("sentence1", "sentence2", index="index")),
        # WNLI: 1 means entailment, as in the hub's ClassLabel (not_entailment, entailment).
        Task("wnli", "WNLI", ("sentence1", "sentence2"), ("not_entailment", "entailment"), ("accuracy",),
             tsv_labels=("0", "1"), test_splits={"test": "WNLI.tsv"},
             tsv=_pair("sentence1", "sentence2", label="label"),
             tsv_test=_pair("sentence1", "sentence2", index="index")),
    ]
}

# GLUE's diagnostic set (AX): no training data of its own; the GLUE server wants AX.tsv predicted by the MNLI
# model, with MNLI's labels. The original download keeps it in diagnostic/diagnostic.tsv (index, sentence1,
# sentence2); the hub has it as nyu-mll/glue config "ax" (premise, hypothesis, label -1, idx).
AX = Task("ax", "AX", ("premise", "hypothesis"), GLUE_TASKS["mnli"].labels, ("accuracy",),
          tsv_labels=GLUE_TASKS["mnli"].tsv_labels, dev_splits=(), test_splits={"test": "AX.tsv"},
          tsv_test=_pair("sentence1", "sentence2", index="index"))
DIAGNOSTIC_OF = {"mnli": AX}  # task -> the diagnostic set its test predictions come with
DIAGNOSTIC_SPLIT = "ax"  # its key among a task's splits
DIAGNOSTIC_TSV = ("diagnostic", "diagnostic.tsv")  # where GLUE's download keeps it, under the data folder

# GLUE's order on the leaderboard and in the report.
GLUE_ORDER = ("cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli")


def _key(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "")


def get_task(name: str) -> Task:
    """A GLUE task by any usual spelling (``SST-2``, ``sst2``, ``STS-B``), or a local task spec (``*.json``)."""
    if name.endswith(".json"):
        return load_task_spec(name)
    if _key(name) in {_key(n) for n in SQUAD_FILES}:  # extractive QA (glue_eval.qa_tasks)
        return Task(**squad_task_fields(next(n for n in SQUAD_FILES if _key(n) == _key(name))))
    by_key = {_key(t.name): t for t in GLUE_TASKS.values()} | {_key(t.display): t for t in GLUE_TASKS.values()}
    if _key(name) not in by_key:
        raise UsageError(
            f"unknown task {name!r}: GLUE tasks are {', '.join(GLUE_TASKS[n].display for n in GLUE_ORDER)} "
            "(or 'all'), extractive QA squad or squad_v2, or give a local task spec file ending in .json"
        )
    return by_key[_key(name)]


def resolve_tasks(spec: str) -> list[Task]:
    """``"all"``, one name, or a comma-separated list of names / spec files."""
    if spec.strip().lower() == "all":
        return [GLUE_TASKS[n] for n in GLUE_ORDER]
    return [get_task(part.strip()) for part in spec.split(",") if part.strip()]


SPEC_KEYS = {"name", "train", "dev", "test", "text_columns", "label_column", "labels", "regression", "metric",
             "index_column"}


def load_task_spec(path: str) -> Task:
    """A local task from a JSON spec; file paths in it are relative to the spec file.

    ``{"name": "polarity", "train": "train.csv", "dev": "dev.csv", "test": "test.csv",
    "text_columns": ["sentence"], "label_column": "label", "labels": ["neg", "pos"],
    "metric": "accuracy"}``; ``"regression": true`` instead of ``labels`` for scores.
    """
    spec = read_json_object(path, "task spec", "give a JSON file describing the task")
    if spec.get("type") == EXTRACTIVE_QA:
        return Task(**qa_spec_fields(spec, path))
    where = f"task spec {path!r}"
    unknown = set(spec) - SPEC_KEYS
    if unknown:
        raise UsageError(f"{where} has unknown keys {sorted(unknown)}: allowed keys are {sorted(SPEC_KEYS)}")
    for key in ("name", "train", "dev", "text_columns", "label_column", "metric"):
        if key not in spec:
            raise UsageError(f"{where} lacks {key!r} (see the glue-eval README section for the format)")
    texts = spec["text_columns"]
    if isinstance(texts, str):
        texts = [texts]
    if not 1 <= len(texts) <= 2:
        raise UsageError(f"{where}: text_columns must name one or two columns, not {texts!r}")
    regression = bool(spec.get("regression", False))
    labels = spec.get("labels")
    if regression == (labels is not None):
        raise UsageError(f"{where}: give either 'labels' (a list of class names) or 'regression': true")
    if labels is not None:
        if not isinstance(labels, list) or len(labels) < 2:
            raise UsageError(f"{where}: labels must be a list of at least two class names, not {labels!r}")
        labels = tuple(str(x) for x in labels)
    metrics = spec["metric"] if isinstance(spec["metric"], list) else [spec["metric"]]
    for m in metrics:
        if m not in METRICS:
            raise UsageError(f"{where}: unknown metric {m!r}; metrics are {', '.join(METRICS)}")
        if regression != (m in ("pearson", "spearmanr")):
            kind = "a regression" if regression else "a classification"
            raise UsageError(f"{where}: metric {m!r} does not fit {kind} task")
        if m == "f1" and len(labels) != 2:
            raise UsageError(f"{where}: 'f1' is for two classes (the second is positive); use 'macro_f1'")
    base = os.path.dirname(os.path.abspath(path))
    files = {"train": spec["train"], "validation": spec["dev"]}
    if spec.get("test"):
        files["test"] = spec["test"]
    files = {split: os.path.join(base, p) for split, p in files.items()}
    name = str(spec["name"])
    return Task(
        name=name, display=name, text_fields=tuple(texts), labels=labels, metrics=tuple(metrics),
        tsv_labels=labels, test_splits={"test": f"{name}.tsv"} if "test" in files else {},
        tsv=TsvLayout(text=tuple(texts), label=spec["label_column"]),
        tsv_test=TsvLayout(text=tuple(texts), index=spec.get("index_column")),
        files=files, glue=False,
    )
