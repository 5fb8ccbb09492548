"""Student initialisation by layer selection: exact copies, loadable folders, clear errors."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoConfig,
    AutoModelForMaskedLM,
    AutoModelForPreTraining,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertModel,
)

from distill.cli import init_main
from distill.models.loading import load_model
from distill.models.student import build_student, init_student
from tests import tiny


def _outputs(model, ids, mask):
    model.eval()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    logits = getattr(out, "logits", None)
    return out.hidden_states, logits


@pytest.mark.parametrize("teacher_fixture,student_type", [
    ("bert_mlm_dir", "bert"),
    ("bert_mlm_dir", "distilbert"),
    ("distilbert_mlm_dir", "distilbert"),
    ("electra_disc_dir", "electra"),
    ("electra_gen_dir", "electra"),
])
def test_student_from_all_layers_reproduces_teacher(request, tmp_path, teacher_fixture, student_type):
    teacher_dir = request.getfixturevalue(teacher_fixture)
    n = AutoConfig.from_pretrained(teacher_dir)
    n = getattr(n, "num_hidden_layers", None) or n.n_layers
    init_student(teacher_dir, list(range(1, n + 1)), str(tmp_path / "s"), student_type)
    teacher = load_model(teacher_dir)
    student = load_model(str(tmp_path / "s"), what="student")
    ids, mask = tiny.random_batch(batch=3, seq=14, pad_last=5)
    t_hidden, t_logits = _outputs(teacher, ids, mask)
    s_hidden, s_logits = _outputs(student, ids, mask)
    real = mask.bool()
    assert len(s_hidden) == len(t_hidden) == n + 1
    for s, t in zip(s_hidden, t_hidden):
        torch.testing.assert_close(s[real], t[real], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s_logits[real], t_logits[real], rtol=1e-5, atol=1e-5)


def _params(module):
    return dict(module.named_parameters())


def test_bert_subset_copies_each_selected_layer(bert_mlm_dir):
    teacher = load_model(bert_mlm_dir)
    student, report = build_student(teacher, [1, 3, 4], "bert")
    assert student.config.num_hidden_layers == 3
    for i, t_layer in enumerate([1, 3, 4]):
        s_p, t_p = _params(student.bert.encoder.layer[i]), _params(teacher.bert.encoder.layer[t_layer - 1])
        assert s_p.keys() == t_p.keys()
        for k in s_p:
            assert torch.equal(s_p[k], t_p[k]), (i, k)
    for k, v in _params(teacher.bert.embeddings).items():
        assert torch.equal(_params(student.bert.embeddings)[k], v)
    for k, v in _params(teacher.cls).items():
        assert torch.equal(_params(student.cls)[k], v), k
    assert report.not_copied == []


def test_bert_to_distilbert_subset_uses_the_documented_mapping(bert_mlm_dir):
    teacher = load_model(bert_mlm_dir)
    student, report = build_student(teacher, [2, 4], "distilbert")
    tb, sd = teacher.bert, student.distilbert
    # written out by hand, independent of the mapping table in distill.models.student
    for i, j in [(0, 1), (1, 3)]:
        t, s = tb.encoder.layer[j], sd.transformer.layer[i]
        pairs = [(s.attention.q_lin, t.attention.self.query), (s.attention.k_lin, t.attention.self.key),
                 (s.attention.v_lin, t.attention.self.value), (s.attention.out_lin, t.attention.output.dense),
                 (s.sa_layer_norm, t.attention.output.LayerNorm), (s.ffn.lin1, t.intermediate.dense),
                 (s.ffn.lin2, t.output.dense), (s.output_layer_norm, t.output.LayerNorm)]
        for sm, tm in pairs:
            assert torch.equal(sm.weight, tm.weight) and torch.equal(sm.bias, tm.bias)
    emb = tb.embeddings
    assert torch.equal(sd.embeddings.word_embeddings.weight, emb.word_embeddings.weight)
    assert torch.equal(sd.embeddings.position_embeddings.weight,
                       emb.position_embeddings.weight + emb.token_type_embeddings.weight[0])
    assert torch.equal(sd.embeddings.LayerNorm.weight, emb.LayerNorm.weight)
    head = teacher.cls.predictions
    assert torch.equal(student.vocab_transform.weight, head.transform.dense.weight)
    assert torch.equal(student.vocab_layer_norm.bias, head.transform.LayerNorm.bias)
    assert torch.equal(student.vocab_projector.bias, head.bias)
    # the decoder stays tied to the word embeddings, as DistilBertForMaskedLM expects
    assert student.vocab_projector.weight.data_ptr() == sd.embeddings.word_embeddings.weight.data_ptr()
    assert report.not_copied == []


def test_saved_folder_loads_with_auto_classes(bert_mlm_dir, electra_disc_dir, tmp_path):
    out = tmp_path / "bert"
    init_student(bert_mlm_dir, "1,3", str(out), "distilbert")
    for auto in (AutoModelForMaskedLM, AutoModelForSequenceClassification):
        model = auto.from_pretrained(out)
        assert model.config.model_type == "distilbert" and model.config.n_layers == 2
    assert AutoTokenizer.from_pretrained(out)("the city").input_ids[0] == 2
    config = json.loads((out / "config.json").read_text())
    assert not config.get("output_hidden_states") and not config.get("output_attentions")
    card = (out / "README.md").read_text()
    assert bert_mlm_dir in card and "1,3" in card
    assert json.loads((out / "student_init.json").read_text())["layers"] == [1, 3]

    out = tmp_path / "electra"
    init_student(electra_disc_dir, "2,4", str(out))
    assert type(AutoModelForPreTraining.from_pretrained(out)).__name__ == "ElectraForPreTraining"
    assert AutoModelForSequenceClassification.from_pretrained(out).config.num_hidden_layers == 2


@pytest.mark.slow
def test_real_minilm_teacher_layers_2_4_6(tmp_path):
    from distill.common.assets import minilm_dir

    teacher_dir = minilm_dir()
    report = init_student(teacher_dir, "2,4,6", str(tmp_path / "s"))
    assert report.layers == [2, 4, 6] and report.student_class == "BertModel"
    student = BertModel.from_pretrained(tmp_path / "s")
    teacher = BertModel.from_pretrained(teacher_dir).eval()
    tok = AutoTokenizer.from_pretrained(tmp_path / "s")
    batch = tok(["Distillation keeps most of the teacher.", "A short one."], padding=True, return_tensors="pt")
    # the teacher with only layers 2,4,6 left in place, run by hand
    teacher.encoder.layer = torch.nn.ModuleList([teacher.encoder.layer[i] for i in (1, 3, 5)])
    teacher.config.num_hidden_layers = 3
    with torch.no_grad():
        expect = teacher(**batch).last_hidden_state
        got = student.eval()(**batch).last_hidden_state
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(got[real], expect[real], rtol=1e-5, atol=1e-5)


def test_help_is_readable():
    exe = shutil.which("distill-init")
    assert exe, "the distill-init console script is not installed: run the README's install command"
    out = subprocess.run([exe, "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for word in ("--teacher", "--layers", "--student-type", "--output", "1-based", "1,5,8,12"):
        assert word in out.stdout


def _bad(capsys, argv):
    with pytest.raises(SystemExit) as exc:
        init_main(argv)
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2
    assert len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize("layers,needle", [
    ("0,1", "1-based"),
    ("1,5", "the teacher has 4 layers"),
    ("2,2", "not strictly increasing"),
    ("3,1", "not strictly increasing"),
    ("", "empty"),
    ("1,x", "integers"),
])
def test_bad_layer_lists_are_one_clear_line(capsys, tmp_path, bert_mlm_dir, layers, needle):
    out = tmp_path / "s"
    err = _bad(capsys, ["--teacher", bert_mlm_dir, "--layers", layers, "--output", str(out)])
    assert needle in err
    assert not out.exists()


def test_unknown_student_type(capsys, tmp_path, bert_mlm_dir):
    err = _bad(capsys, ["--teacher", bert_mlm_dir, "--layers", "1", "--student-type", "gpt2",
                        "--output", str(tmp_path / "s")])
    assert "gpt2" in err and "distilbert" in err


@pytest.mark.parametrize("teacher_fixture,student_type", [("distilbert_mlm_dir", "bert"), ("electra_disc_dir", "distilbert"),
                                                          ("bert_mlm_dir", "electra")])
def test_unmappable_pair(request, capsys, tmp_path, teacher_fixture, student_type):
    err = _bad(capsys, ["--teacher", request.getfixturevalue(teacher_fixture), "--layers", "1",
                        "--student-type", student_type, "--output", str(tmp_path / "s")])
    assert "cannot be mapped" in err and student_type in err
    assert not (tmp_path / "s").exists()


def test_non_empty_output_needs_overwrite(capsys, tmp_path, bert_mlm_dir):
    out = tmp_path / "s"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    err = _bad(capsys, ["--teacher", bert_mlm_dir, "--layers", "1,2", "--output", str(out)])
    assert "--overwrite" in err and (out / "keep.txt").read_text() == "mine"
    assert init_main(["--teacher", bert_mlm_dir, "--layers", "1,2", "--output", str(out), "--overwrite"]) == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()


def test_missing_teacher_path(capsys, tmp_path):
    err = _bad(capsys, ["--teacher", str(tmp_path / "nope"), "--layers", "1", "--output", str(tmp_path / "s")])
    assert "does not exist" in err and "nope" in err
    assert not (tmp_path / "s").exists()


def test_nothing_half_written_when_a_step_fails(tmp_path, bert_mlm_dir, monkeypatch):
    import distill.models.student as student_mod

    def broken(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(student_mod, "model_card", broken)
    with pytest.raises(RuntimeError):
        init_student(bert_mlm_dir, "1,2", str(tmp_path / "s"))
    assert list(Path(tmp_path).iterdir()) == []


def test_unreachable_hub_id_is_one_clear_line(capsys, tmp_path):
    # offline (HF_HUB_OFFLINE=1), a hub id cannot be fetched: say so instead of a traceback
    err = _bad(capsys, ["--teacher", "no-such-org/no-such-model", "--layers", "1", "--output", str(tmp_path / "s")])
    assert "no-such-org/no-such-model" in err and "hub id" in err
    assert not (tmp_path / "s").exists()


# --- the pooler travels -----------------------------------------------------------------------

POOLER_KEYS = {"bert.pooler.dense.weight", "bert.pooler.dense.bias"}


@pytest.fixture(scope="module")
def pooled_teachers(tmp_path_factory, vocab_dir):
    """Checkpoints that hold a pooler: BertModel, BertForPreTraining, and a BertForMaskedLM that kept it."""
    root = tmp_path_factory.mktemp("pooled")
    return {
        "bert_base": tiny.save_model("bert_base", root / "base", vocab_dir),
        "bert_pretraining": tiny.save_bert_with_pooler("bert_pretraining", root / "pretraining", vocab_dir),
        "bert_mlm_pooled": tiny.save_bert_with_pooler("bert_mlm_pooled", root / "mlm_pooled", vocab_dir),
    }


@pytest.mark.parametrize("kind", ["bert_base", "bert_pretraining", "bert_mlm_pooled"])
def test_the_pooled_output_of_an_all_layer_student_equals_the_teachers(pooled_teachers, tmp_path, kind):
    teacher_dir = pooled_teachers[kind]
    init_student(teacher_dir, "1,2,3,4", str(tmp_path / "s"))
    # transformers' own BertModel reads the pooler from each checkpoint file: the reference
    teacher, t_info = BertModel.from_pretrained(teacher_dir, output_loading_info=True)
    student, s_info = BertModel.from_pretrained(tmp_path / "s", output_loading_info=True)
    assert not t_info["missing_keys"] and not s_info["missing_keys"]
    ids, mask = tiny.random_batch(batch=3, seq=14, pad_last=5)
    with torch.no_grad():
        expect = teacher.eval()(input_ids=ids, attention_mask=mask).pooler_output
        got = student.eval()(input_ids=ids, attention_mask=mask).pooler_output
    torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["bert_pretraining", "bert_mlm_pooled"])
def test_a_masked_lm_student_loads_like_its_teacher(pooled_teachers, tmp_path, kind):
    teacher_dir = pooled_teachers[kind]
    out = tmp_path / "s"
    report = init_student(teacher_dir, "2,4", str(out))
    assert report.student_class == "BertForMaskedLM" and report.not_copied == []
    assert POOLER_KEYS <= set(tiny.saved_weights(out))
    _, info = AutoModelForSequenceClassification.from_pretrained(out, output_loading_info=True)
    assert info["missing_keys"] == {"classifier.weight", "classifier.bias"}  # only the classifier is new
    _, s_info = AutoModelForMaskedLM.from_pretrained(out, output_loading_info=True)
    _, t_info = AutoModelForMaskedLM.from_pretrained(teacher_dir, output_loading_info=True)
    assert not s_info["missing_keys"] and not t_info["missing_keys"]
    # the unused pooler is reported as unexpected, as for the teacher itself (which may add NSP keys)
    assert s_info["unexpected_keys"] == POOLER_KEYS <= t_info["unexpected_keys"]
    assert "pooler" in (out / "README.md").read_text()


def test_a_bert_for_pretraining_teacher_gives_its_masked_lm_head(pooled_teachers):
    from transformers import BertForPreTraining

    teacher_dir = pooled_teachers["bert_pretraining"]
    reference = BertForPreTraining.from_pretrained(teacher_dir)
    student, report = build_student(load_model(teacher_dir), [1, 4])
    assert type(student).__name__ == "BertForMaskedLM" and report.not_copied == []
    for k, v in _params(reference.cls.predictions).items():
        assert torch.equal(_params(student.cls.predictions)[k], v), k
    for k, v in _params(reference.bert.pooler).items():
        assert torch.equal(_params(student.bert.pooler)[k], v), k
    for k, v in _params(reference.bert.encoder.layer[3]).items():
        assert torch.equal(_params(student.bert.encoder.layer[1])[k], v), k


def test_no_pooler_is_invented_when_the_teacher_has_none(bert_mlm_dir, tmp_path):
    init_student(bert_mlm_dir, "1,2", str(tmp_path / "s"))
    assert not POOLER_KEYS & set(tiny.saved_weights(tmp_path / "s"))
    _, info = AutoModelForSequenceClassification.from_pretrained(tmp_path / "s", output_loading_info=True)
    assert POOLER_KEYS <= info["missing_keys"]  # honestly new, not a random pooler passed off as the teacher's


def test_distill_train_keeps_the_teachers_pooler(pooled_teachers, tmp_path):
    import random

    from distill.cli import train_main

    teacher_dir = pooled_teachers["bert_mlm_pooled"]
    rng = random.Random(0)
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(" ".join(rng.choice(tiny.WORDS) for _ in range(12)) for _ in range(120)) + "\n")
    expect = {k: v for k, v in tiny.saved_weights(teacher_dir).items() if k in POOLER_KEYS}
    common = dict(teacher=teacher_dir, corpus=str(corpus), cache_dir=str(tmp_path / "cache"),
                  weights={"ce": 5.0, "mlm": 2.0, "cos": 1.0}, block_size=16, per_device_batch_size=8,
                  learning_rate=1e-2, max_steps=3, precision="fp32", save_steps=0, logging_steps=1,
                  progress=False, device="cpu")
    init_student(teacher_dir, "1,3", str(tmp_path / "init"))
    runs = {"built": dict(student_layers=[1, 3]), "from_folder": dict(student=str(tmp_path / "init"), student_layers=[1, 3])}
    for name, extra in runs.items():
        out = tmp_path / name
        assert train_main(tiny.cli_args({**common, **extra, "output_dir": str(out)})) == 0
        saved = tiny.saved_weights(out)
        for k, v in expect.items():
            assert torch.equal(saved[k], v), (name, k)
        # training did change the layers: the pooler is kept, not the whole student
        start = tiny.saved_weights(tmp_path / "init")
        assert not torch.equal(saved["bert.encoder.layer.0.output.dense.weight"],
                               start["bert.encoder.layer.0.output.dense.weight"])
        _, info = AutoModelForSequenceClassification.from_pretrained(out, output_loading_info=True)
        assert info["missing_keys"] == {"classifier.weight", "classifier.bias"}


def test_fp16_o2_saves_the_pooler_bit_for_bit(pooled_teachers, tmp_path, monkeypatch):
    """The frozen pooler has no fp32 master under O2; the saved one is still the teacher's, not an fp16 rounding."""
    import random

    from distill.cli import train_main
    from distill.train.precision import Precision

    real = Precision.from_config
    monkeypatch.setattr(Precision, "from_config",  # O2 semantics on a CPU (tiny tensors: speed is no matter)
                        staticmethod(lambda *a, **k: real(*a, **{**k, "allow_cpu_fp16": True})))
    teacher_dir = pooled_teachers["bert_mlm_pooled"]
    rng = random.Random(1)
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(" ".join(rng.choice(tiny.WORDS) for _ in range(12)) for _ in range(60)) + "\n")
    out = tmp_path / "run"
    assert train_main(tiny.cli_args(dict(
        teacher=teacher_dir, corpus=str(corpus), cache_dir=str(tmp_path / "cache"), output_dir=str(out),
        student_layers=[1, 3], weights={"ce": 5.0, "mlm": 2.0, "cos": 1.0}, block_size=16, per_device_batch_size=8,
        max_steps=2, precision="fp16", fp16_opt_level="O2", save_steps=0, progress=False, device="cpu"))) == 0
    expect, saved = tiny.saved_weights(teacher_dir), tiny.saved_weights(out)
    weight = expect["bert.pooler.dense.weight"]
    assert not torch.equal(weight.half().float(), weight)  # an fp16 round trip would show
    for k in POOLER_KEYS:
        assert saved[k].dtype == torch.float32 and torch.equal(saved[k], expect[k]), k


def test_the_pooler_is_read_from_sharded_and_pickled_checkpoints(pooled_teachers, tmp_path):
    from distill.models.loading import checkpoint_pooler

    source = pooled_teachers["bert_mlm_pooled"]
    expect = {k.removeprefix("bert.pooler."): v for k, v in tiny.saved_weights(source).items() if k in POOLER_KEYS}
    config = AutoConfig.from_pretrained(source)
    model = load_model(source)
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="20KB")
    assert (sharded / "model.safetensors.index.json").exists() and not (sharded / "model.safetensors").exists()
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(Path(source) / "config.json", pickled / "config.json")
    torch.save(tiny.saved_weights(source), pickled / "pytorch_model.bin")
    for folder in (sharded, pickled):
        got = checkpoint_pooler(str(folder), config)
        assert got.keys() == expect.keys(), folder
        for k in expect:
            assert torch.equal(got[k], expect[k]), (folder, k)


@pytest.mark.parametrize("kind", ["bert_mlm", "distilbert_mlm", "electra_disc", "electra_gen", "roberta_mlm", "xlmr_mlm",
                                  "mpnet_mlm"])
def test_every_family_entrys_paths_name_real_modules(kind):
    """The registry's query/key/value, attention and pooler paths resolve in a real model of the family."""
    from distill.models.loading import (
        family_of,
        get_path,
        hidden_size,
        num_heads,
        num_layers,
        transformer_layers,
    )

    builders = {"roberta": tiny.build_roberta, "xlmr": tiny.build_roberta, "mpnet": tiny.build_mpnet}
    model = builders[kind.split("_")[0]](kind, 50) if kind.split("_")[0] in builders else tiny.build_model(kind)
    family = family_of(model)
    layers = transformer_layers(model)
    assert len(layers) == num_layers(model) > 0  # layers_path and num_layers_field agree
    assert hidden_size(model) % num_heads(model) == 0
    for path in (family.query_path, family.key_path, family.value_path):
        proj = get_path(layers[0], path)
        assert isinstance(proj, torch.nn.Linear) and proj.out_features == hidden_size(model), path
    assert isinstance(get_path(layers[0], family.self_attention_path).dropout, (torch.nn.Dropout, float))
    if family.pooler_path:
        built = family.build_pooler(model.config)
        assert type(built).__name__.endswith("Pooler") and built.dense.in_features == hidden_size(model)


def test_an_untied_bert_teacher_gives_its_distilbert_student_its_own_decoder(tmp_path):
    """A BERT teacher whose decoder is not its word embeddings (tie_word_embeddings false): the DistilBERT student
    keeps the teacher's decoder, and its masked-LM logits are those of the BERT student of the same layers."""
    from transformers import BertForMaskedLM

    torch.manual_seed(0)
    teacher = BertForMaskedLM(tiny.make_config("bert", tie_word_embeddings=False)).eval()
    with torch.no_grad():
        teacher.cls.predictions.decoder.weight.normal_(0, 0.5)
    assert not torch.equal(teacher.cls.predictions.decoder.weight, teacher.bert.embeddings.word_embeddings.weight)
    distil, report = build_student(teacher, [1, 3], "distilbert")
    bert, _ = build_student(teacher, [1, 3], "bert")
    assert torch.equal(distil.vocab_projector.weight, teacher.cls.predictions.decoder.weight)
    assert report.not_copied == [] and not distil.config.tie_word_embeddings
    ids = torch.tensor([[2, 5, 9, 11, 3, 0], [2, 7, 8, 3, 0, 0]])
    mask = (ids != 0).long()
    with torch.no_grad():
        a = distil.eval()(input_ids=ids, attention_mask=mask).logits
        b = bert.eval()(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(a[mask.bool()], b[mask.bool()], atol=1e-4)
