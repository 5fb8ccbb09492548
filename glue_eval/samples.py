"""Tiny synthetic GLUE folders, in the original TSV layout or the hub's, for offline tries and tests.

    python -m glue_eval.samples DIR [--layout tsv|parquet|csv]

writes ``DIR/<task>/...`` for the nine tasks with a few dozen rows each, laid
out exactly like GLUE's download (``CoLA/train.tsv`` with no header, MNLI's 12-
and 16-column files ...) or like a snapshot of ``nyu-mll/glue``
(``cola/train-00000-of-00001.parquet``). Labels follow a rule a model can
learn (a marker word per class), so a run on them is a real, if small, check.
"""

from __future__ import annotations

import argparse
import csv
import os
import random

from .tasks import GLUE_TASKS, TSV_FILES, Task

WORDS = ("the of and to in a is was for on as with by he at from his an were are which this be or has had "
         "not but first one their its new after who they have her she two been other when there all").split()
MARKERS = ("city", "school", "world")  # class c's texts contain MARKERS[c]

# Original GLUE headers (train, dev, test); None = no header line (CoLA's train/dev).
HEADERS = {
    "cola": (None, None, ("index", "sentence")),
    "sst2": (("sentence", "label"),) * 2 + (("index", "sentence"),),
    "mrpc": (("Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"),) * 2
            + (("index", "#1 ID", "#2 ID", "#1 String", "#2 String"),),
    "stsb": (("index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2",
              "score"),) * 2
            + (("index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2"),),
    "qqp": (("id", "qid1", "qid2", "question1", "question2", "is_duplicate"),) * 2
           + (("id", "question1", "question2"),),
    "mnli": (("index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
              "sentence1_parse", "sentence2_parse", "sentence1", "sentence2", "label1", "gold_label"),
             ("index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
              "sentence1_parse", "sentence2_parse", "sentence1", "sentence2", "label1", "label2", "label3",
              "label4", "label5", "gold_label"),
             ("index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
              "sentence1_parse", "sentence2_parse", "sentence1", "sentence2")),
    "qnli": (("index", "question", "sentence", "label"),) * 2 + (("index", "question", "sentence"),),
    "rte": (("index", "sentence1", "sentence2", "label"),) * 2 + (("index", "sentence1", "sentence2"),),
    "wnli": (("index", "sentence1", "sentence2", "label"),) * 2 + (("index", "sentence1", "sentence2"),),
}


def make_examples(task: Task, n: int, seed: int, labelled: bool = True) -> list[dict]:
    """``n`` rows: the task's text fields, ``label`` (class id, score, or -1) and ``idx``.

    Classification: the last text field holds the marker word of the row's class.
    Regression: the score is 5 * (share of the second text's words copied from the first).
    Some texts hold a lone double quote, which GLUE's TSVs carry unescaped.
    """
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        texts = [[rng.choice(WORDS) for _ in range(rng.randint(4, 9))] for _ in task.text_fields]
        if task.is_regression:
            n2 = len(texts[-1])
            keep = rng.randint(0, min(n2, len(texts[0])))
            texts[-1] = texts[0][:keep] + ["z" + w for w in texts[-1][keep:]]
            label = round(5.0 * keep / n2, 3)
        else:
            label = i % task.num_labels
            texts[-1].insert(rng.randint(0, len(texts[-1])), MARKERS[label])
        if i % 7 == 3:
            texts[0].append('"')  # unbalanced quote: the original files are read without quoting
        row = {f: " ".join(t) for f, t in zip(task.text_fields, texts)}
        row["label"] = label if labelled else (-1.0 if task.is_regression else -1)
        row["idx"] = i
        rows.append(row)
    return rows


def sample_splits(task: Task, sizes=(24, 12, 8), seed: int = 0) -> dict[str, list[dict]]:
    """Split -> rows for every split of ``task`` (MNLI: both dev and both test splits)."""
    n_train, n_dev, n_test = sizes
    splits = {"train": make_examples(task, n_train, seed)}
    for k, s in enumerate(task.dev_splits):
        splits[s] = make_examples(task, n_dev, seed + 1 + k)
    for k, s in enumerate(task.test_splits):
        splits[s] = make_examples(task, n_test, seed + 11 + k, labelled=False)
    return splits


def write_tsv_layout(task: Task, folder: str, splits: dict[str, list[dict]]) -> None:
    """Files as GLUE's download has them: ``train.tsv``, ``dev.tsv``/``dev_matched.tsv``, ``test.tsv`` ..."""
    os.makedirs(folder, exist_ok=True)
    train_h, dev_h, test_h = HEADERS[task.name]
    for split, rows in splits.items():
        test = split.startswith("test")
        header = test_h if test else (train_h if split == "train" else dev_h)
        layout = task.tsv_test if test else task.tsv
        columns = header or layout.columns
        lines = [] if header is None else ["\t".join(header)]
        for row in rows:
            values = {c: row[f] for c, f in zip(layout.text, task.text_fields)}
            if layout.label:
                values[layout.label] = (f"{row['label']:g}" if task.is_regression
                                        else task.tsv_labels[row["label"]])
            if layout.index:
                values[layout.index] = str(row["idx"])
            lines.append("\t".join(values.get(c, _filler(c, row["idx"])) for c in columns))
        with open(os.path.join(folder, TSV_FILES[split]), "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")


def _filler(column: str, i: int) -> str:
    if column in ("index", "id", "qid1", "qid2", "promptID", "old_index", "year"):
        return str(1000 + i)
    if column == "label1":
        return "neutral"
    return {"source": "gj04", "original_label": "", "genre": "fiction"}.get(column, f"{column}-{i}")


def write_hub_layout(task: Task, folder: str, splits: dict[str, list[dict]], fmt: str = "parquet") -> None:
    """Files as a snapshot of ``nyu-mll/glue`` has them: ``<split>-00000-of-00001.parquet`` (or ``<split>.csv``)."""
    os.makedirs(folder, exist_ok=True)
    columns = [*task.text_fields, "label", "idx"]
    for split, rows in splits.items():
        if fmt == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            table = pa.table({c: [r[c] for r in rows] for c in columns})
            pq.write_table(table, os.path.join(folder, f"{split}-00000-of-00001.parquet"))
        elif fmt == "csv":
            with open(os.path.join(folder, f"{split}.csv"), "w", encoding="utf-8", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(columns)
                writer.writerows([r[c] for c in columns] for r in rows)
        else:
            raise ValueError(f"format {fmt!r}: parquet or csv")


def write_glue_sample(data_dir: str, layout: str = "tsv", tasks=None, sizes=(24, 12, 8), seed: int = 0) -> str:
    """A whole tiny GLUE folder; ``layout`` is ``tsv`` (original) or ``parquet``/``csv`` (the hub's)."""
    for name in tasks or GLUE_TASKS:
        task = GLUE_TASKS[name]
        splits = sample_splits(task, sizes, seed)
        if layout == "tsv":
            write_tsv_layout(task, os.path.join(data_dir, task.display), splits)
        else:
            write_hub_layout(task, os.path.join(data_dir, task.name), splits, layout)
    return data_dir


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m glue_eval.samples", description=__doc__.split("\n\n")[0])
    parser.add_argument("data_dir")
    parser.add_argument("--layout", choices=("tsv", "parquet", "csv"), default="tsv")
    parser.add_argument("--train", type=int, default=200, help="training rows per task")
    ns = parser.parse_args(argv)
    write_glue_sample(ns.data_dir, ns.layout, sizes=(ns.train, max(ns.train // 4, 8), max(ns.train // 8, 8)))
    print(f"wrote a synthetic GLUE folder ({ns.layout} layout) in {ns.data_dir}")


if __name__ == "__main__":
    main()
