"""RoBERTa and XLM-R students: the family registry's proof, on tiny models over a byte-level BPE trained here."""

import csv
import json
import random
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
)

from distill.cli import init_main, train_main
from distill.models.loading import load_model
from distill.models.student import build_student, init_student
from tests import tiny


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    return tiny.save_bpe_tokenizer(tmp_path_factory.mktemp("bpe"))


@pytest.fixture(scope="module")
def vocab_size(bpe_dir):
    return len(AutoTokenizer.from_pretrained(bpe_dir))


@pytest.fixture(scope="module")
def roberta_mlm_dir(tmp_path_factory, bpe_dir):
    return tiny.save_roberta("roberta_mlm", tmp_path_factory.mktemp("roberta_mlm"), bpe_dir)


def _teacher(tmp_path_factory, bpe_dir, kind):
    return tiny.save_roberta(kind, tmp_path_factory.mktemp(kind), bpe_dir)


def _outputs(model, ids, mask):
    model.eval()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    return out.hidden_states, getattr(out, "logits", None), getattr(out, "pooler_output", None)


@pytest.mark.parametrize("kind", ["roberta_mlm", "roberta_base", "xlmr_mlm", "xlmr_base"])
def test_student_from_all_layers_reproduces_the_teacher_with_padding(tmp_path_factory, tmp_path, bpe_dir,
                                                                     vocab_size, kind):
    teacher_dir = _teacher(tmp_path_factory, bpe_dir, kind)
    init_student(teacher_dir, "1,2,3,4", str(tmp_path / "s"))
    teacher, student = load_model(teacher_dir), load_model(str(tmp_path / "s"), what="student")
    assert type(student) is type(teacher)
    # rows of different lengths, padded with <pad> (id 1): RoBERTa counts positions past padding_idx
    ids, mask = tiny.roberta_batch(vocab_size, batch=3, seq=14, pad_last=5)
    t_hidden, t_logits, t_pooled = _outputs(teacher, ids, mask)
    s_hidden, s_logits, s_pooled = _outputs(student, ids, mask)
    real = mask.bool()
    assert len(s_hidden) == len(t_hidden) == 5
    for s, t in zip(s_hidden, t_hidden):
        torch.testing.assert_close(s[real], t[real], rtol=1e-5, atol=1e-5)
    if kind.endswith("mlm"):
        torch.testing.assert_close(s_logits[real], t_logits[real], rtol=1e-5, atol=1e-5)
    else:
        torch.testing.assert_close(s_pooled, t_pooled, rtol=1e-5, atol=1e-5)


def _params(module):
    return dict(module.named_parameters())


@pytest.mark.parametrize("kind", ["roberta_mlm", "xlmr_mlm"])
def test_subset_copies_equal_their_sources(tmp_path_factory, bpe_dir, kind):
    teacher = load_model(_teacher(tmp_path_factory, bpe_dir, kind))
    student, report = build_student(teacher, [1, 3, 4])
    assert student.config.num_hidden_layers == 3 and report.not_copied == []
    for i, t_layer in enumerate([1, 3, 4]):
        s_p, t_p = _params(student.roberta.encoder.layer[i]), _params(teacher.roberta.encoder.layer[t_layer - 1])
        assert s_p.keys() == t_p.keys()
        for k in s_p:
            assert torch.equal(s_p[k], t_p[k]), (i, k)
    for part in ("embeddings",):
        for k, v in _params(getattr(teacher.roberta, part)).items():
            assert torch.equal(_params(getattr(student.roberta, part))[k], v), k
    for k, v in _params(teacher.lm_head).items():
        assert torch.equal(_params(student.lm_head)[k], v), k
    # the decoder stays tied to the word embeddings, as RobertaForMaskedLM ties them
    assert student.lm_head.decoder.weight.data_ptr() == student.roberta.embeddings.word_embeddings.weight.data_ptr()


def test_the_student_folder_loads_in_the_auto_classes(roberta_mlm_dir, tmp_path):
    out = tmp_path / "s"
    assert init_main(["--teacher", roberta_mlm_dir, "--layers", "2,4", "--output", str(out)]) == 0
    model, info = AutoModelForMaskedLM.from_pretrained(out, output_loading_info=True)
    assert type(model).__name__ == "RobertaForMaskedLM" and not info["missing_keys"]
    _, info = AutoModelForSequenceClassification.from_pretrained(out, output_loading_info=True)
    assert all(k.startswith("classifier.") for k in info["missing_keys"])
    tok = AutoTokenizer.from_pretrained(out)
    assert tok("the city").input_ids[0] == tok.cls_token_id == 0 and "token_type_ids" not in tok("the city")


def test_a_tokenizer_that_pads_with_another_id_is_refused(tmp_path, bpe_dir, capsys):
    teacher_dir = tiny.save_roberta("roberta_mlm", tmp_path / "t", bpe_dir, pad_token_id=3)
    with pytest.raises(SystemExit) as exc:
        init_main(["--teacher", teacher_dir, "--layers", "1,2", "--output", str(tmp_path / "s")])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and len(err.splitlines()) == 1, err
    assert "pads with id 1" in err and "pad_token_id is 3" in err
    assert not (tmp_path / "s").exists()


def _corpus(path: Path) -> str:
    rng = random.Random(0)
    path.write_text("\n".join(" ".join(rng.choice(tiny.WORDS) for _ in range(rng.randint(4, 20))) + " ."
                              for _ in range(200)) + "\n")
    return str(path)


def _train_args(teacher, corpus, out, tmp_path, **overrides):
    values = dict(teacher=teacher, corpus=corpus, output_dir=str(out), cache_dir=str(tmp_path / "cache"),
                  student_layers=[1, 3], weights={"ce": 5.0, "mlm": 2.0, "cos": 1.0}, block_size=24,
                  data_mode="group", per_device_batch_size=8, learning_rate=1e-3, max_steps=8, precision="fp32",
                  save_steps=0, logging_steps=1, progress=False, device="cpu")
    values.update(overrides)
    return tiny.cli_args(values)


def test_distill_train_runs_the_distilbert_objective_on_a_roberta_teacher(roberta_mlm_dir, tmp_path):
    out = tmp_path / "run"
    # group mode pads short paragraphs with <pad>: the masked and position paths both see padding
    assert train_main(_train_args(roberta_mlm_dir, _corpus(tmp_path / "c.txt"), out, tmp_path)) == 0
    log = [json.loads(line) for line in (out / "logs" / "train_log.jsonl").read_text().splitlines()]
    for term in ("ce", "mlm", "cos"):
        assert all(term in row and torch.isfinite(torch.tensor(row[term])) for row in log), term
    assert log[-1]["loss"] < log[0]["loss"]
    model, info = AutoModelForMaskedLM.from_pretrained(out, output_loading_info=True)
    assert type(model).__name__ == "RobertaForMaskedLM" and model.config.num_hidden_layers == 2
    assert not info["missing_keys"]
    assert "5*ce" in (out / "README.md").read_text()


def test_a_block_longer_than_the_usable_positions_is_refused(roberta_mlm_dir, tmp_path, capsys):
    # 66 position rows, of which padding_idx + 1 = 2 come before position 0: 64 usable
    with pytest.raises(SystemExit) as exc:
        train_main(_train_args(roberta_mlm_dir, _corpus(tmp_path / "c.txt"), tmp_path / "run", tmp_path,
                               block_size=65))
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and "block_size 65" in err and "<= 64" in err, err
    assert not (tmp_path / "run" / "model.safetensors").exists()


@pytest.mark.slow
def test_glue_eval_fine_tunes_a_roberta_student(roberta_mlm_dir, tmp_path):
    from glue_eval.cli import main

    student = tmp_path / "student"
    init_student(roberta_mlm_dir, "1,2,3,4", str(student))
    rng = random.Random(0)
    words = [w for w in tiny.WORDS if w != "city"]

    def rows(n):
        out = []
        for i in range(n):
            text = [rng.choice(words) for _ in range(rng.randint(3, 6))]
            if i % 2:
                text.insert(rng.randint(0, len(text)), "city")
            out.append((" ".join(text), "yes" if i % 2 else "no"))
        return out

    for name, n in (("train.csv", 160), ("dev.csv", 100)):
        with open(tmp_path / name, "w", newline="", encoding="utf-8") as f:
            csv.writer(f).writerows([("text", "label"), *rows(n)])
    spec = {"name": "has_city", "train": "train.csv", "dev": "dev.csv", "text_columns": ["text"],
            "label_column": "label", "labels": ["no", "yes"], "metric": "accuracy"}
    (tmp_path / "task.json").write_text(json.dumps(spec))
    out = tmp_path / "glue"
    assert main(["--model", str(student), "--task", str(tmp_path / "task.json"), "--output_dir", str(out),
                 "--seed", "0", "--use_cpu", "--learning_rate", "3e-3", "--per_device_train_batch_size", "8",
                 "--num_train_epochs", "3", "--warmup_steps", "0.1", "--disable_tqdm", "true"]) == 0
    (path,) = out.rglob("result.json")
    record = json.loads(path.read_text())
    assert record["train"]["examples"] == 160
    assert record["dev"]["validation"]["accuracy"] > 0.8  # chance is 0.5 (balanced dev set)


def test_a_bert_tokenizer_beside_a_roberta_model_is_refused(tmp_path, vocab_dir, capsys):
    # a WordPiece tokenizer gives pairs token type 1, which a one-type RoBERTa has no row for
    teacher_dir = tiny.save_roberta("roberta_mlm", tmp_path / "t", vocab_dir, pad_token_id=0)
    with pytest.raises(SystemExit) as exc:
        init_main(["--teacher", teacher_dir, "--layers", "1,2", "--output", str(tmp_path / "s")])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and "token type 1" in err and "1 type(s)" in err, err


@pytest.mark.slow
def test_the_distilroberta_script_runs_its_recipe_through_torchrun(tmp_path, bpe_dir):
    """scripts/distill_distilroberta.sh on a tiny 12-layer RoBERTa in place of roberta-base: the recipe's own
    layer selection and objective, through the real script and torchrun."""
    import os
    import subprocess

    teacher = tiny.save_roberta("roberta_mlm", tmp_path / "teacher", bpe_dir, num_hidden_layers=12)
    script = Path(__file__).parent.parent / "scripts" / "distill_distilroberta.sh"
    out = tmp_path / "run"
    overrides = tiny.cli_args({"teacher": teacher, "corpus": _corpus(tmp_path / "c.txt"),
                               "cache_dir": str(tmp_path / "cache"), "block_size": 32, "per_device_batch_size": 2,
                               "max_steps": 2, "precision": "fp32", "num_proc": 1, "save_steps": 0,
                               "progress": False, "device": "cpu"})
    done = subprocess.run(["bash", str(script), "1", str(out)] + overrides, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    recipe = json.loads((out / "distill_config.json").read_text())
    assert recipe["weights"] == {"ce": 5.0, "mlm": 2.0, "cos": 1.0} and recipe["fp16_opt_level"] == "O2"
    assert json.loads((out / "student_init.json").read_text())["layers"] == [1, 3, 5, 8, 10, 12]
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "roberta" and config["num_hidden_layers"] == 6


def test_a_new_family_is_one_registry_entry(monkeypatch, tmp_path, bpe_dir, vocab_size, capsys):
    """CamemBERT, registered inside this test as one entry and nothing else, runs through distill-init's
    parser, student building and distill-train."""
    import dataclasses

    from transformers import CamembertConfig, CamembertForMaskedLM

    from distill.cli import build_init_parser
    from distill.models.families import FAMILIES

    entry = dataclasses.replace(
        FAMILIES["roberta"], name="camembert", classes={"base": "CamembertModel", "mlm": "CamembertForMaskedLM"},
        pooler_class="transformers.models.camembert.modeling_camembert:CamembertPooler")
    monkeypatch.setitem(FAMILIES, "camembert", entry)

    ref = tiny.build_roberta("roberta_mlm", vocab_size)
    teacher = CamembertForMaskedLM(CamembertConfig(**{k: v for k, v in ref.config.to_dict().items()
                                                     if k not in ("model_type", "architectures")}))
    teacher.load_state_dict(ref.state_dict())
    teacher_dir = tmp_path / "camembert"
    teacher.save_pretrained(teacher_dir)
    AutoTokenizer.from_pretrained(bpe_dir).save_pretrained(teacher_dir)

    help_text = build_init_parser().format_help()
    assert "camembert" in help_text and "camembert->camembert" in help_text
    assert init_main(["--teacher", str(teacher_dir), "--layers", "1,2,3,4", "--student-type", "camembert",
                      "--output", str(tmp_path / "s")]) == 0
    student = load_model(str(tmp_path / "s"), what="student")
    assert type(student) is CamembertForMaskedLM
    ids, mask = tiny.roberta_batch(vocab_size, batch=3, seq=14, pad_last=5)
    real = mask.bool()
    torch.testing.assert_close(_outputs(student, ids, mask)[1][real], _outputs(teacher, ids, mask)[1][real],
                               rtol=1e-5, atol=1e-5)
    out = tmp_path / "run"
    assert train_main(_train_args(str(teacher_dir), _corpus(tmp_path / "c.txt"), out, tmp_path, max_steps=2)) == 0
    assert json.loads((out / "config.json").read_text())["model_type"] == "camembert"


def test_an_incomplete_family_entry_is_refused_when_written():
    import dataclasses

    from distill.models.families import FAMILIES

    with pytest.raises(ValueError, match="headless"):
        dataclasses.replace(FAMILIES["roberta"], name="x", heads={})
    with pytest.raises(ValueError, match="go together"):
        dataclasses.replace(FAMILIES["roberta"], name="x", pooler_class=None)
