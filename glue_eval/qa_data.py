"""Reading extractive-QA splits: SQuAD's JSON files, JSON lines of the hub's rows, or the hub itself.

Whatever the source, a split comes back as a ``datasets.Dataset`` of the hub's ``squad`` columns:
``id``, ``question``, ``context``, ``answers`` (``{"text": [...], "answer_start": [...]}``, character offsets
into the context; empty lists for a v2 question without an answer) and ``idx`` (the row number).
"""

from __future__ import annotations

import json
import os

import datasets

from distill.common.errors import UsageError

from .qa_tasks import SQUAD_FILES, SQUAD_HUB
from .tasks import Task

FEATURES = datasets.Features({
    "id": datasets.Value("string"), "question": datasets.Value("string"), "context": datasets.Value("string"),
    "answers": {"text": datasets.Sequence(datasets.Value("string")),
                "answer_start": datasets.Sequence(datasets.Value("int32"))},
    "idx": datasets.Value("int64"),
})


def split_file(task: Task, split: str, data_dir: str | None) -> str | None:
    """The file of ``split``: the spec's or an --eval_files one, else SQuAD's own file name in ``data_dir``
    (or in a ``squad``/``squad_v2`` folder inside it); None when the split comes from the hub."""
    if task.files and split in task.files:
        return task.files[split]
    if data_dir is None:
        return None
    if not os.path.isdir(data_dir):
        raise UsageError(f"--data_dir {data_dir!r} does not exist: give the folder holding SQuAD's JSON files")
    name = SQUAD_FILES.get(task.name, {}).get(split)
    if name is None:
        raise UsageError(f"task {task.name} has no {split} file: add \"{split}\": \"FILE\" to its spec")
    folders = [data_dir] + [os.path.join(data_dir, e) for e in sorted(os.listdir(data_dir))
                            if e.lower() in (task.name, task.display.lower()) and os.path.isdir(os.path.join(data_dir, e))]
    for folder in folders:
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    raise UsageError(f"missing {task.display} {split} file in {data_dir!r}: looked for {name} (SQuAD's own name) "
                     f"there and in {task.name}/ inside it")


def check_qa_sources(task: Task, splits, data_dir: str | None) -> None:
    """Fail before any training if a split's file is missing (no file is read)."""
    for split in splits:
        path = split_file(task, split, data_dir)
        if path is not None and not os.path.isfile(path):
            raise UsageError(f"task {task.name}: {split} file {path!r} does not exist")
        if path is None and task.name not in SQUAD_HUB:
            raise UsageError(f"task {task.name} has no {split} file")


def load_qa_splits(task: Task, splits, data_dir: str | None) -> dict[str, datasets.Dataset]:
    """Split name -> dataset (module docstring); files where the task or ``data_dir`` names them, else the hub."""
    out, from_hub = {}, []
    for split in splits:
        path = split_file(task, split, data_dir)
        if path is None:
            from_hub.append(split)
        else:
            out[split] = read_squad_file(path)
    if from_hub:
        out.update(_load_hub(task, from_hub))
    if not task.version_2:  # v1 scores every question against its answers: one without any is v2's
        for split in splits:
            empty = sum(1 for answers in out[split]["answers"] if not answers["text"])
            if empty:
                raise UsageError(
                    f"task {task.name}: {empty} questions of its {split} split have no answer, which SQuAD v1 cannot "
                    "score: use --task squad_v2 for SQuAD 2.0 files, or \"version_2\": true in the task's spec")
    return {s: out[s] for s in splits}


def read_squad_file(path: str) -> datasets.Dataset:
    """A SQuAD-format JSON file (``{"data": [{"paragraphs": [{"context", "qas": [...]}]}]}``) or JSON lines of
    the hub's rows (``id, question, context, answers``)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as err:
        raise UsageError(f"{path}: {err.strerror}: give a SQuAD-format JSON file") from None
    try:
        if path.endswith(".jsonl"):
            rows = [_hub_row(json.loads(line), path) for line in text.splitlines() if line.strip()]
        else:
            rows = _squad_rows(json.loads(text), path)
    except json.JSONDecodeError as err:
        raise UsageError(f"{path} is not JSON ({err}): give SQuAD's JSON layout, or .jsonl with one row a line") from None
    if not rows:
        raise UsageError(f"{path} holds no questions")
    return _to_dataset(rows)


def _squad_rows(document, path: str) -> list[dict]:
    if not isinstance(document, dict) or not isinstance(document.get("data"), list):
        raise UsageError(f"{path} is not in SQuAD's layout: expected {{\"data\": [{{\"paragraphs\": [{{\"context\": "
                         "..., \"qas\": [...]}]}]}}")
    rows = []
    for article in document["data"]:
        for paragraph in article.get("paragraphs", []):
            context = paragraph.get("context")
            for qa in paragraph.get("qas", []):
                if not isinstance(context, str) or "question" not in qa or "id" not in qa:
                    raise UsageError(f"{path}: a paragraph lacks its context, or a question its id or text "
                                     f"(near question {qa.get('id', '?')!r})")
                # v2's unanswerable questions carry no answers (their plausible_answers are not gold)
                answers = [] if qa.get("is_impossible") else qa.get("answers", [])
                rows.append({"id": str(qa["id"]), "question": qa["question"], "context": context,
                             "answers": _answers(answers, path, qa["id"])})
    return rows


def _hub_row(row, path: str) -> dict:
    if not isinstance(row, dict) or not {"id", "question", "context", "answers"} <= set(row):
        raise UsageError(f"{path}: every line needs id, question, context and answers (the hub's squad columns)")
    answers = row["answers"]
    if isinstance(answers, dict):  # the hub's {"text": [...], "answer_start": [...]}
        answers = [{"text": t, "answer_start": s} for t, s in zip(answers["text"], answers["answer_start"])]
    return {"id": str(row["id"]), "question": row["question"], "context": row["context"],
            "answers": _answers(answers, path, row["id"])}


def _answers(answers, path: str, qid) -> dict:
    try:
        texts = [str(a["text"]) for a in answers]
        starts = [int(a["answer_start"]) for a in answers]
    except (KeyError, TypeError, ValueError):
        raise UsageError(f"{path}: question {qid!r}: each answer needs text and an integer answer_start") from None
    return {"text": texts, "answer_start": starts}


def _to_dataset(rows: list[dict]) -> datasets.Dataset:
    columns = {k: [r[k] for r in rows] for k in ("id", "question", "context", "answers")}
    columns["idx"] = list(range(len(rows)))
    return datasets.Dataset.from_dict(columns, features=FEATURES)


def _load_hub(task: Task, splits) -> dict[str, datasets.Dataset]:
    hub = SQUAD_HUB.get(task.name)
    try:
        loaded = datasets.load_dataset(hub)
    except Exception as err:  # noqa: BLE001 - offline, renamed repo: one message
        raise UsageError(f"could not load {hub} from the hub: {type(err).__name__}: {err}; without internet give "
                         f"--data_dir with {', '.join(SQUAD_FILES[task.name].values())}") from None
    out = {}
    for split in splits:
        ds = loaded[split]
        rows = [{"id": str(r["id"]), "question": r["question"], "context": r["context"], "answers": r["answers"]}
                for r in ds]
        out[split] = _to_dataset(rows)
    return out
