"""Loading a task's splits from the hub, GLUE's original TSV download, hub-layout files, or local files.

Whatever the source, a split comes back as a ``datasets.Dataset`` with the
task's text fields (hub column names), ``label`` (class id in the task's label
order; -1 where a test split has none; a float score for regression) and
``idx`` (the row's index; test files' own index column, since the GLUE server
matches predictions by it).
"""

from __future__ import annotations

import csv
import glob
import json
import os
import sys

import datasets

from distill.common.errors import UsageError

from .tasks import DIAGNOSTIC_OF, DIAGNOSTIC_TSV, TSV_FILES, Task

HUB_DATASET = "nyu-mll/glue"
HUB_PATTERNS = ("{split}.parquet", "{split}-*.parquet", "{split}.csv", "{split}-*.csv", "{split}.jsonl")

csv.field_size_limit(1 << 28)  # long passages (QNLI) exceed csv's 128 KiB default on some files


def splits_needed(task: Task, predict_test: bool = False) -> list[str]:
    return ["train", *task.dev_splits, *(task.test_splits if predict_test else ())]


def load_splits(task: Task, splits, data_dir: str | None = None, skip_bad_rows: bool = False
                ) -> dict[str, datasets.Dataset]:
    """Split name -> dataset; a clear :class:`UsageError` for any missing file or bad row."""
    if task.is_qa:  # SQuAD's JSON layout: glue_eval.qa_data
        from .qa_data import load_qa_splits

        return load_qa_splits(task, splits, data_dir)
    if task.files is not None:
        return {s: _read_local(task, s, skip_bad_rows) for s in splits}
    if data_dir is None:
        return _load_hub(task, splits)
    folder = task_folder(task, data_dir)
    return {s: _read_glue_file(task, s, find_split_file(task, s, folder), skip_bad_rows) for s in splits}


def check_sources(task: Task, splits, data_dir: str | None) -> None:
    """Fail before any training if a split file is missing (cheap: no file is read)."""
    if task.is_qa:
        from .qa_data import check_qa_sources

        return check_qa_sources(task, splits, data_dir)
    if task.files is not None:
        for s in splits:
            if s not in task.files:
                raise UsageError(f"task {task.name} has no {s} file in its spec: add \"{s}\": \"FILE\"")
            if not os.path.isfile(task.files[s]):
                raise UsageError(f"task {task.name}: {s} file {task.files[s]!r} does not exist")
    elif data_dir is not None:
        folder = task_folder(task, data_dir)
        for s in splits:
            find_split_file(task, s, folder)


def task_folder(task: Task, data_dir: str) -> str:
    """``DATA_DIR/MNLI`` (GLUE's download) or ``DATA_DIR/mnli`` (the hub's), any case; else DATA_DIR itself."""
    if not os.path.isdir(data_dir):
        raise UsageError(f"--data_dir {data_dir!r} does not exist: give the folder holding the GLUE task folders")
    wanted = {task.display.lower(), task.name.lower()}
    for entry in sorted(os.listdir(data_dir)):
        if entry.lower() in wanted and os.path.isdir(os.path.join(data_dir, entry)):
            return os.path.join(data_dir, entry)
    if os.path.exists(os.path.join(data_dir, TSV_FILES["train"])) or glob.glob(os.path.join(data_dir, "train*")):
        return data_dir  # the task's own folder was given
    raise UsageError(
        f"no {task.display} folder in {data_dir!r}: expected {task.display}/ (GLUE's download) "
        f"or {task.name}/ (the hub's layout) inside it"
    )


def find_split_file(task: Task, split: str, folder: str) -> str:
    tsv = os.path.join(folder, TSV_FILES[split])
    if os.path.isfile(tsv):
        return tsv
    for pattern in HUB_PATTERNS:
        found = sorted(glob.glob(os.path.join(folder, pattern.format(split=split))))
        if found:
            return found[0] if len(found) == 1 else ";".join(found)
    raise UsageError(
        f"missing {task.display} {split} split in {folder!r}: looked for {TSV_FILES[split]} (GLUE's original "
        f"layout) and {split}.parquet, {split}-*.parquet, {split}.csv (the hub's layout)"
    )


def load_diagnostic(task: Task, data_dir: str | None = None, skip_bad_rows: bool = False
                    ) -> tuple[datasets.Dataset | None, str]:
    """GLUE's diagnostic set for ``task`` (MNLI's AX), with ``task``'s columns: ``(dataset, source)``.

    ``(None, why)`` when the data is not at hand (the caller says AX.tsv was skipped), and
    ``(None, "")`` for a task without a diagnostic set. Read from the hub (config ``ax``) when
    ``data_dir`` is None; else from ``DATA_DIR/diagnostic/diagnostic.tsv`` (GLUE's download) or
    ``DATA_DIR/ax/test.*`` (the hub's layout).
    """
    ax = DIAGNOSTIC_OF.get(task.name) if task.glue else None
    if ax is None:
        return None, ""
    if data_dir is None:
        try:
            ds = datasets.load_dataset(HUB_DATASET, ax.name, split="test")
        except Exception as err:  # noqa: BLE001 - offline or missing: AX is skipped, the task is not
            return None, f"could not load {HUB_DATASET} ({ax.name}) from the hub ({type(err).__name__})"
        columns = ds.to_dict()
        rows = {f: columns[f] for f in task.text_fields}
        rows["label"] = [-1] * len(ds)
        rows["idx"] = columns["idx"] if "idx" in columns else list(range(len(ds)))
        return _to_dataset(task, rows), f"{HUB_DATASET} ({ax.name})"
    entries = {e.lower(): e for e in os.listdir(data_dir)} if os.path.isdir(data_dir) else {}
    folder, name = DIAGNOSTIC_TSV
    if folder in entries:
        path = os.path.join(data_dir, entries[folder], name)
        if os.path.isfile(path):
            table, where = _read_table(path, skip_bad_rows)
            return _pick(task, table, where, path, ax.tsv_test.text, None, ax.tsv_test.index, None), path
    if ax.name in entries:
        try:
            path = find_split_file(ax, "test", os.path.join(data_dir, entries[ax.name]))
        except UsageError:
            path = None
        if path:
            return _read_glue_file(ax, "test", path, skip_bad_rows), path
    return None, (f"no {'/'.join(DIAGNOSTIC_TSV)} (GLUE's download) or {ax.name}/test.parquet (the hub's layout) "
                  f"in {data_dir!r}")


# ----------------------------------------------------------------------------- the hub


def _load_hub(task: Task, splits) -> dict[str, datasets.Dataset]:
    try:
        loaded = datasets.load_dataset(HUB_DATASET, task.name)
    except Exception as err:  # noqa: BLE001 - offline, missing auth, renamed repo: all one message
        raise UsageError(
            f"could not load {HUB_DATASET} ({task.name}) from the hub: {type(err).__name__}: {err}; "
            "without internet give --data_dir with a local GLUE copy"
        ) from None
    out = {}
    for split in splits:
        ds = loaded[split]
        columns = ds.to_dict()
        rows = {f: columns[f] for f in task.text_fields}
        labels = columns["label"]
        names = getattr(ds.features["label"], "names", None)
        if names is not None and tuple(names) != task.labels:
            # Map by name so a reordered hub ClassLabel could never swap classes silently.
            labels = [-1 if x < 0 else task.labels.index(names[x]) for x in labels]
        rows["label"] = labels
        rows["idx"] = columns["idx"] if "idx" in columns else list(range(len(ds)))
        out[split] = _to_dataset(task, rows)
    return out


# ----------------------------------------------------------------------------- files


def _read_glue_file(task: Task, split: str, path: str, skip_bad_rows: bool) -> datasets.Dataset:
    if path.endswith(".tsv") and os.path.basename(path) == TSV_FILES[split]:
        # GLUE's original download: its own column names, labels spelt as in tsv_labels.
        layout = task.tsv_test if split.startswith("test") else task.tsv
        table, where = _read_table(path, skip_bad_rows, columns=layout.columns)
        return _pick(task, table, where, path, layout.text, layout.label, layout.index, task.tsv_labels)
    # The hub's column layout (a snapshot of nyu-mll/glue, or an export of it); maybe several shards.
    parts = [_read_table(part, skip_bad_rows) + (part,) for part in path.split(";")]
    picked = [_pick(task, t, w, p, task.text_fields, "label", "idx" if "idx" in t else None, None)
              for t, w, p in parts]
    return picked[0] if len(picked) == 1 else datasets.concatenate_datasets(picked)


def _read_local(task: Task, split: str, skip_bad_rows: bool) -> datasets.Dataset:
    path = task.files[split]
    if not os.path.isfile(path):
        raise UsageError(f"task {task.name}: {split} file {path!r} does not exist")
    table, where = _read_table(path, skip_bad_rows)
    label = task.tsv.label
    if split == "test" and label not in table:
        label = None  # test files may come without labels
    return _pick(task, table, where, path, task.tsv.text, label, task.tsv_test.index if split == "test" else None,
                 task.labels)


def _pick(task: Task, table: dict, where: list, path: str, text_cols, label_col, index_col, label_names
          ) -> datasets.Dataset:
    """The task's columns out of a raw table; labels checked against ``label_names``.

    ``label_names=None`` means the hub's layout: class ids (-1 on test splits) or names.
    """
    wanted = [*text_cols, *([label_col] if label_col else []), *([index_col] if index_col else [])]
    for col in wanted:
        if col not in table:
            raise UsageError(
                f"{path}: no column {col!r} (it has {' | '.join(table) or 'none'}); "
                f"{task.display} files need columns {', '.join(wanted)}"
            )
    rows = {f: ["" if v is None else str(v) for v in table[c]] for f, c in zip(task.text_fields, text_cols)}
    n = len(where)
    if label_col is None:
        rows["label"] = [-1] * n
    elif label_names is None:
        rows["label"] = [_hub_label(task, v, path, w) for v, w in zip(table[label_col], where)]
    else:
        rows["label"] = [_label(task, v, label_names, path, w) for v, w in zip(table[label_col], where)]
    if index_col:
        try:
            rows["idx"] = [int(v) for v in table[index_col]]
        except (TypeError, ValueError):
            raise UsageError(f"{path}: index column {index_col!r} holds a value that is not an integer") from None
    else:
        rows["idx"] = list(range(n))
    return _to_dataset(task, rows)


def _read_table(path: str, skip_bad_rows: bool = False, columns=None) -> tuple[dict[str, list], list[str]]:
    """Raw columns of a .tsv/.csv/.jsonl/.parquet file, and where each row came from ("line 7").

    ``columns`` names the columns of a file without a header line (CoLA). Every
    delimited row must have the header's column count. TSV is read without
    quote handling, as GLUE's own loaders do: its texts hold unbalanced quotes.
    """
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        table = pq.read_table(path).to_pydict()
        n = len(next(iter(table.values()), []))
        return table, [f"row {i + 1}" for i in range(n)]
    if path.endswith((".jsonl", ".json")):
        records, where = [], []
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise UsageError(f"{path} line {n} is not JSON ({err}): JSONL has one object per line") from None
                if not isinstance(record, dict):
                    raise UsageError(f"{path} line {n} is not a JSON object: JSONL has one object per line")
                records.append(record)
                where.append(f"line {n}")
        keys = list(dict.fromkeys(k for r in records for k in r))
        return {k: [r.get(k) for r in records] for k in keys}, where
    if not path.endswith((".tsv", ".csv")):
        raise UsageError(f"{path}: unsupported file type; use .tsv, .csv, .jsonl or .parquet")
    tsv = path.endswith(".tsv")
    skipped = 0
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t" if tsv else ",", quoting=csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL)
        header = list(columns) if columns is not None else next(reader, None)
        if header is None:
            raise UsageError(f"{path} is empty: expected a header line and rows")
        table: dict[str, list] = {c: [] for c in header}
        where = []
        for row in reader:
            if not row:
                continue
            if len(row) != len(header):
                if skip_bad_rows:
                    skipped += 1
                    continue
                raise UsageError(
                    f"{path} line {reader.line_num}: {len(row)} columns where there should be {len(header)} "
                    f"({' | '.join(header)}); fix the row, or pass --skip_bad_rows to drop such rows"
                )
            for c, v in zip(header, row):
                table[c].append(v)
            where.append(f"line {reader.line_num}")
    if skipped:
        print(f"warning: {path}: skipped {skipped} rows with the wrong column count (--skip_bad_rows)",
              file=sys.stderr)
    return table, where


def _label(task: Task, value, names, path: str, where: str):
    """A label cell to a class id (by its name in ``names``) or a float score."""
    if task.is_regression:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise UsageError(
                f"{path} {where}: score {value!r} is not a number ({task.display} is regression)"
            ) from None
    text = str(value).strip()
    if text not in names:
        raise UsageError(
            f"{path} {where}: label {text!r} is not one of {task.display}'s labels {list(names)}"
        )
    return names.index(text)


def _hub_label(task: Task, value, path: str, where: str):
    """The hub's layout stores class ids (-1 on test splits); accept class names too."""
    if task.is_regression:
        return _label(task, value, None, path, where)
    text = str(value).strip()
    if text in task.labels:
        return task.labels.index(text)
    try:
        idx = int(text)
    except ValueError:
        idx = None
    if idx is None or not -1 <= idx < len(task.labels):
        raise UsageError(
            f"{path} {where}: label {text!r} is not one of {task.display}'s labels: class ids "
            f"0..{len(task.labels) - 1} or names {list(task.labels)}"
        )
    return idx


def _to_dataset(task: Task, rows: dict[str, list]) -> datasets.Dataset:
    features = {f: datasets.Value("string") for f in task.text_fields}
    features["label"] = datasets.Value("float32" if task.is_regression else "int64")
    features["idx"] = datasets.Value("int64")
    return datasets.Dataset.from_dict(rows, features=datasets.Features(features))


def load_unlabelled(task: Task, path: str) -> dict[str, list[str]]:
    """Extra in-domain text for ``--unlabelled_file``: text field -> texts (no labels: the teacher gives them).

    ``.txt``: one example per line; for a two-text task the two texts are separated by a tab.
    ``.tsv``/``.csv``/``.jsonl``/``.parquet``: a table with the task's text columns (the hub's names,
    or for a local task the spec's ``text_columns``); other columns are ignored.
    """
    n_fields = len(task.text_fields)
    if path.endswith(".txt"):
        columns = {f: [] for f in task.text_fields}
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                line = line.rstrip("\n").rstrip("\r")
                if not line.strip():
                    continue
                parts = line.split("\t") if n_fields == 2 else [line]
                if len(parts) != n_fields:
                    raise UsageError(
                        f"{path} line {n}: {len(parts)} tab-separated texts where {task.display} has {n_fields} "
                        f"({', '.join(task.text_fields)}): put one tab between the two texts"
                    )
                for field, text in zip(task.text_fields, parts):
                    columns[field].append(text)
    else:
        table, _ = _read_table(path)
        names = task.tsv.text if task.files is not None and task.tsv is not None else task.text_fields
        if not all(c in table for c in names):
            names = task.text_fields
        missing = [c for c in names if c not in table]
        if missing:
            raise UsageError(f"{path}: no column {missing[0]!r} (it has {' | '.join(table) or 'none'}); "
                             f"unlabelled {task.display} rows need columns {', '.join(names)}")
        columns = {f: ["" if v is None else str(v) for v in table[c]] for f, c in zip(task.text_fields, names)}
    if not columns[task.text_fields[0]]:
        raise UsageError(f"{path} holds no text: give one example per line (or table rows)")
    return columns
