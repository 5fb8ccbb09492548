"""Loading: GLUE's original TSV layout, the hub's column layout (parquet/CSV, and load_dataset itself)
and local task specs give the same examples, and the same label means the same class everywhere."""

import json

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distill.common.errors import UsageError
from glue_eval import data as glue_data
from glue_eval.data import load_splits, splits_needed
from glue_eval.samples import sample_splits, write_hub_layout, write_tsv_layout
from glue_eval.tasks import GLUE_TASKS, get_task

# Rows as GLUE's download spells them (real-looking lines, hand-written), and what each must load as:
# (texts in the task's text-field order, the hub's class id). Labels in the TSVs are the original
# strings ("contradiction", "not_entailment", "1"), ids are the hub's ClassLabel positions.
T = "\t"
ORIGINAL = {
    "cola": {
        "train.tsv": ["gj04\t1\t\tOur friends won't buy this analysis.", "gj04\t0\t*\tThey drank the pub."],
        "dev.tsv": ["clc95\t0\t*\tThe more we study verbs, the crazier they get get."],
    },
    "sst2": {
        "train.tsv": ["sentence\tlabel", "hide new secretions from the parental units \t0", "a gorgeous film \t1"],
        "dev.tsv": ["sentence\tlabel", "it 's a charming and often affecting journey . \t1"],
    },
    "mrpc": {
        "train.tsv": ["Quality\t#1 ID\t#2 ID\t#1 String\t#2 String",
                      '1\t702876\t702977\tAmrozi accused his brother , whom he called " the witness " .\t'
                      'Referring to him as only " the witness " , Amrozi accused his brother .',
                      "0\t2108705\t2108831\tYucaipa owned Dominick 's .\tYucaipa bought Dominick 's in 1995 ."],
        "dev.tsv": ["Quality\t#1 ID\t#2 ID\t#1 String\t#2 String", "1\t1355540\t1355592\tHe said .\tHe stated ."],
    },
    "stsb": {
        "train.tsv": ["index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore",
                      "0\tmain-captions\tMSRvid\t2012test\t0001\tnone\tnone\tA plane is taking off.\t"
                      "An air plane is taking off.\t5.000",
                      "1\tmain-captions\tMSRvid\t2012test\t0004\tnone\tnone\tA man is playing a flute.\t"
                      "A man is eating.\t0.600"],
        "dev.tsv": ["index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore",
                    "0\tmain-captions\tMSRvid\t2012test\t0000\tnone\tnone\tA man with a hard hat is dancing.\t"
                    "A man wearing a hard hat is dancing.\t5.000"],
    },
    "qqp": {
        "train.tsv": ["id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate",
                      "133273\t213221\t213222\tHow is the life of a math student?\tWhich level is enough?\t0",
                      "402555\t536040\t536041\tHow do I control my anger?\tHow do I control anger?\t1"],
        "dev.tsv": ["id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate",
                    "201359\t303345\t303346\tWhy are African-Americans so beautiful?\t"
                    "Why are hispanics so beautiful?\t0"],
    },
    "mnli": {
        "train.tsv": ["index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\t"
                      "sentence1_parse\tsentence2_parse\tsentence1\tsentence2\tlabel1\tgold_label",
                      "0\t31193\t31193n\tgovernment\t( ( Conceptually cream ) )\t( Product )\t(ROOT)\t(ROOT)\t"
                      "Conceptually cream skimming has two basic dimensions.\tProduct and geography are what "
                      "make cream skimming work. \tneutral\tneutral",
                      "1\t101457\t101457e\ttelephone\t( you )\t( You )\t(ROOT)\t(ROOT)\t"
                      "you know during the season\tYou lose the things.\tentailment\tentailment",
                      "2\t134793\t134793c\tfiction\t( ( One ) )\t( ( A ) )\t(ROOT)\t(ROOT)\t"
                      "One of our number will carry out your instructions.\tA member of my team will "
                      "execute your orders with immense precision.\tcontradiction\tcontradiction"],
        "dev_matched.tsv": ["index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\t"
                            "sentence1_parse\tsentence2_parse\tsentence1\tsentence2\tlabel1\tlabel2\tlabel3\t"
                            "label4\tlabel5\tgold_label",
                            "0\t63735\t63735n\tslate\t( ( The ) )\t( ( The ) )\t(ROOT)\t(ROOT)\tThe new rights are "
                            "nice enough\tEveryone really likes the newest benefits \tneutral\tentailment\t"
                            "neutral\tneutral\tneutral\tneutral"],
        "dev_mismatched.tsv": ["index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\t"
                               "sentence1_parse\tsentence2_parse\tsentence1\tsentence2\tlabel1\tlabel2\tlabel3\t"
                               "label4\tlabel5\tgold_label",
                               "0\t75290\t75290c\tletters\t( ( Your ) )\t( ( Your ) )\t(ROOT)\t(ROOT)\tYour "
                               "contribution helped make it possible.\tYour contributions were of no help.\t"
                               "contradiction\tcontradiction\tcontradiction\tcontradiction\tcontradiction\t"
                               "contradiction"],
    },
    "qnli": {
        "train.tsv": ["index\tquestion\tsentence\tlabel",
                      "0\tWhen did the third Digimon series begin?\tUnlike the two seasons before it.\tnot_entailment",
                      "1\tWhich missile batteries often have individual launchers?\tThey are often several "
                      "kilometres apart.\tentailment"],
        "dev.tsv": ["index\tquestion\tsentence\tlabel",
                    "0\tWhat came into force after the new constitution?\tThe Treaty came into force.\tentailment"],
    },
    "rte": {
        "train.tsv": ["index\tsentence1\tsentence2\tlabel",
                      "0\tNo Weapons of Mass Destruction Found in Iraq Yet.\tWeapons Found in Iraq.\tnot_entailment",
                      "1\tA place of sorrow, after Pope John Paul II died.\tPope Benedict XVI is the new leader.\t"
                      "entailment"],
        "dev.tsv": ["index\tsentence1\tsentence2\tlabel", "0\tDana Reeve died.\tChristopher Reeve had an accident.\t"
                    "not_entailment"],
    },
    "wnli": {
        "train.tsv": ["index\tsentence1\tsentence2\tlabel",
                      "0\tI stuck a pin through a carrot.\tThe carrot had a hole.\t1",
                      "1\tJohn couldn't see the stage with Billy in front of him.\tJohn is so short.\t0"],
        "dev.tsv": ["index\tsentence1\tsentence2\tlabel",
                    "0\tThe drain is clogged with hair.\tThe hair has to be cleaned.\t1"],
    },
}
EXPECTED = {
    "cola": {"train": [(("Our friends won't buy this analysis.",), 1), (("They drank the pub.",), 0)],
             "validation": [(("The more we study verbs, the crazier they get get.",), 0)]},
    "sst2": {"train": [(("hide new secretions from the parental units ",), 0), (("a gorgeous film ",), 1)],
             "validation": [(("it 's a charming and often affecting journey . ",), 1)]},
    "mrpc": {"train": [(('Amrozi accused his brother , whom he called " the witness " .',
                         'Referring to him as only " the witness " , Amrozi accused his brother .'), 1),
                       (("Yucaipa owned Dominick 's .", "Yucaipa bought Dominick 's in 1995 ."), 0)],
             "validation": [(("He said .", "He stated ."), 1)]},
    "stsb": {"train": [(("A plane is taking off.", "An air plane is taking off."), 5.0),
                       (("A man is playing a flute.", "A man is eating."), 0.6)],
             "validation": [(("A man with a hard hat is dancing.", "A man wearing a hard hat is dancing."), 5.0)]},
    "qqp": {"train": [(("How is the life of a math student?", "Which level is enough?"), 0),
                      (("How do I control my anger?", "How do I control anger?"), 1)],
            "validation": [(("Why are African-Americans so beautiful?", "Why are hispanics so beautiful?"), 0)]},
    "mnli": {"train": [(("Conceptually cream skimming has two basic dimensions.",
                         "Product and geography are what make cream skimming work. "), 1),
                       (("you know during the season", "You lose the things."), 0),
                       (("One of our number will carry out your instructions.",
                         "A member of my team will execute your orders with immense precision."), 2)],
             "validation_matched": [(("The new rights are nice enough",
                                      "Everyone really likes the newest benefits "), 1)],
             "validation_mismatched": [(("Your contribution helped make it possible.",
                                         "Your contributions were of no help."), 2)]},
    "qnli": {"train": [(("When did the third Digimon series begin?", "Unlike the two seasons before it."), 1),
                       (("Which missile batteries often have individual launchers?",
                         "They are often several kilometres apart."), 0)],
             "validation": [(("What came into force after the new constitution?", "The Treaty came into force."), 0)]},
    "rte": {"train": [(("No Weapons of Mass Destruction Found in Iraq Yet.", "Weapons Found in Iraq."), 1),
                      (("A place of sorrow, after Pope John Paul II died.",
                        "Pope Benedict XVI is the new leader."), 0)],
            "validation": [(("Dana Reeve died.", "Christopher Reeve had an accident."), 1)]},
    "wnli": {"train": [(("I stuck a pin through a carrot.", "The carrot had a hole."), 1),
                       (("John couldn't see the stage with Billy in front of him.", "John is so short."), 0)],
             "validation": [(("The drain is clogged with hair.", "The hair has to be cleaned."), 1)]},
}
# The hub's ClassLabel names (nyu-mll/glue), written out here rather than read from the registry.
HUB_NAMES = {"cola": ["unacceptable", "acceptable"], "sst2": ["negative", "positive"],
             "mrpc": ["not_equivalent", "equivalent"], "qqp": ["not_duplicate", "duplicate"],
             "mnli": ["entailment", "neutral", "contradiction"], "qnli": ["entailment", "not_entailment"],
             "rte": ["entailment", "not_entailment"], "wnli": ["not_entailment", "entailment"]}


def _write_original(root, name):
    folder = root / GLUE_TASKS[name].display
    folder.mkdir(parents=True)
    for filename, lines in ORIGINAL[name].items():
        (folder / filename).write_text("\n".join(lines) + "\n", encoding="utf-8")


def _write_hub_parquet(root, name):
    task = GLUE_TASKS[name]
    folder = root / name
    folder.mkdir(parents=True)
    for split, rows in EXPECTED[name].items():
        cols = {f: [texts[i] for texts, _ in rows] for i, f in enumerate(task.text_fields)}
        cols["label"] = [label for _, label in rows]
        cols["idx"] = list(range(len(rows)))
        pq.write_table(pa.table(cols), folder / f"{split}-00000-of-00001.parquet")


def _as_examples(task, ds):
    return [(tuple(row[f] for f in task.text_fields), pytest.approx(row["label"]) if task.is_regression
             else row["label"]) for row in ds]


@pytest.mark.parametrize("name", list(ORIGINAL))
def test_original_tsv_and_hub_parquet_give_the_same_examples_and_classes(tmp_path, name):
    task = GLUE_TASKS[name]
    _write_original(tmp_path / "glue", name)
    _write_hub_parquet(tmp_path / "hub", name)
    splits = ["train", *task.dev_splits]
    from_tsv = load_splits(task, splits, str(tmp_path / "glue"))
    from_hub = load_splits(task, splits, str(tmp_path / "hub"))
    for split in splits:
        assert _as_examples(task, from_tsv[split]) == EXPECTED[name][split]
        assert _as_examples(task, from_hub[split]) == EXPECTED[name][split]
    if task.labels:
        assert list(task.labels) == HUB_NAMES[name]


def test_every_split_of_every_task_loads_alike_from_tsv_parquet_and_csv(tmp_path):
    for name, task in GLUE_TASKS.items():
        splits = sample_splits(task, sizes=(9, 5, 4), seed=3)
        write_tsv_layout(task, str(tmp_path / "tsv" / task.display), splits)
        write_hub_layout(task, str(tmp_path / "pq" / name), splits, "parquet")
        write_hub_layout(task, str(tmp_path / "csv" / name), splits, "csv")
        wanted = splits_needed(task, predict_test=True)
        assert set(wanted) == set(splits)
        loaded = [load_splits(task, wanted, str(tmp_path / layout)) for layout in ("tsv", "pq", "csv")]
        for split in wanted:
            tsv, pqt, csv_ = (d[split].to_dict() for d in loaded)
            assert tsv == pqt == csv_, (name, split)
            assert tsv["label"] == pytest.approx([r["label"] for r in splits[split]])
            assert tsv["idx"] == [r["idx"] for r in splits[split]]  # test files: their own index column


def test_the_hub_path_loads_nyu_mll_glue_and_maps_classes_by_name(tmp_path, monkeypatch):
    task = get_task("mnli")
    _write_original(tmp_path, "mnli")
    want = load_splits(task, ["train", *task.dev_splits], str(tmp_path))
    calls = []

    def fake_load_dataset(path, name=None, **kwargs):
        calls.append((path, name))
        # A hub copy whose ClassLabel lists the classes in another order: ids must be mapped by name.
        names = ["contradiction", "entailment", "neutral"]
        out = {}
        for split, ds in want.items():
            rows = ds.to_dict()
            rows["label"] = [names.index(task.labels[i]) for i in rows["label"]]
            features = datasets.Features({"premise": datasets.Value("string"), "hypothesis": datasets.Value("string"),
                                          "label": datasets.ClassLabel(names=names), "idx": datasets.Value("int32")})
            out[split] = datasets.Dataset.from_dict(rows, features=features)
        return datasets.DatasetDict(out)

    monkeypatch.setattr(glue_data.datasets, "load_dataset", fake_load_dataset)
    got = load_splits(task, ["train", *task.dev_splits], data_dir=None)
    assert calls == [("nyu-mll/glue", "mnli")]
    for split in want:
        assert got[split].to_dict() == want[split].to_dict()


def test_the_hub_path_without_internet_says_to_use_data_dir(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("offline")

    monkeypatch.setattr(glue_data.datasets, "load_dataset", offline)
    with pytest.raises(UsageError, match="--data_dir"):
        load_splits(get_task("rte"), ["train"], None)


def test_a_local_task_spec_reads_csv_tsv_and_jsonl_with_named_labels(tmp_path):
    (tmp_path / "train.csv").write_text('text,polarity\n"good, really",pos\nbad,neg\n', encoding="utf-8")
    (tmp_path / "dev.tsv").write_text('text\tpolarity\nnot "bad\tpos\n', encoding="utf-8")
    (tmp_path / "test.jsonl").write_text('{"id": 7, "text": "meh"}\n', encoding="utf-8")
    spec = {"name": "polarity", "train": "train.csv", "dev": "dev.tsv", "test": "test.jsonl",
            "text_columns": ["text"], "label_column": "polarity", "labels": ["neg", "pos"],
            "metric": ["accuracy", "f1"], "index_column": "id"}
    (tmp_path / "polarity.json").write_text(json.dumps(spec), encoding="utf-8")
    task = get_task(str(tmp_path / "polarity.json"))
    assert task.labels == ("neg", "pos") and task.metrics == ("accuracy", "f1") and not task.glue
    got = load_splits(task, ["train", "validation", "test"])
    assert got["train"].to_dict() == {"text": ["good, really", "bad"], "label": [1, 0], "idx": [0, 1]}
    assert got["validation"].to_dict() == {"text": ['not "bad'], "label": [1], "idx": [0]}
    assert got["test"].to_dict() == {"text": ["meh"], "label": [-1], "idx": [7]}


def test_a_local_regression_spec_reads_float_scores(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"a": "x", "b": "y", "s": 0.25}\n{"a": "p", "b": "q", "s": 3}\n')
    spec = {"name": "sim", "train": "d.jsonl", "dev": "d.jsonl", "text_columns": ["a", "b"], "label_column": "s",
            "regression": True, "metric": ["pearson", "spearmanr"]}
    (tmp_path / "sim.json").write_text(json.dumps(spec))
    task = get_task(str(tmp_path / "sim.json"))
    assert task.is_regression and task.text_fields == ("a", "b")
    assert load_splits(task, ["train"])["train"]["label"] == [0.25, 3.0]


@pytest.mark.parametrize("spec, message", [
    ({"labels": ["a", "b"], "metric": "pearson"}, "does not fit"),
    ({"labels": ["a", "b", "c"], "metric": "f1"}, "macro_f1"),
    ({"metric": "accuracy"}, "either 'labels'"),
    ({"labels": ["a", "b"], "metric": "accuracy", "colour": "red"}, "unknown keys"),
])
def test_a_bad_task_spec_is_one_clear_error(tmp_path, spec, message):
    full = {"name": "t", "train": "a.csv", "dev": "b.csv", "text_columns": "text", "label_column": "y", **spec}
    (tmp_path / "t.json").write_text(json.dumps(full))
    with pytest.raises(UsageError, match=message):
        get_task(str(tmp_path / "t.json"))
