"""distill-export: every registered family and head gives ONNX files that match torch, int8 beside them.

References are independent of the exporter: the torch model loaded afresh with from_pretrained
(hidden states, logits) and sentence-transformers' own ``encode`` for a sentence pipeline; the ONNX
files are read with onnxruntime directly and through the toolkit's runner. Models are tiny and
random, built here for every family of the registry (a family added there is tested here too).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

ort = pytest.importorskip("onnxruntime")

from distill.common.errors import UsageError  # noqa: E402
from distill.export import onnx as export_onnx  # noqa: E402
from distill.export.cli import main as export_main  # noqa: E402
from distill.export.runtime import OnnxClassifier, OnnxEncoder, model_file  # noqa: E402
from distill.models.families import FAMILIES  # noqa: E402
from tests import tiny  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# mixed lengths, so the batch is padded; the longest is cut by the tiny models' 64 positions
BATCH = ["the cat sat on the mat.", "he was one of the first who made a new school in the city after the war, "
         "and it was known in the world for years", "a", "where is the university? it is over there."]
HEADS = ("encoder", "sentence", "classifier")


def tiny_config(family_name: str, num_labels: int = 3):
    """A small config of any registered family, sized through the registry's own field names."""
    family = FAMILIES[family_name]
    config = family.cls("base").config_class(vocab_size=tiny.VOCAB_SIZE, max_position_embeddings=66, pad_token_id=0,
                                             num_labels=num_labels)
    for field, value in ((family.num_layers_field, 2), (family.hidden_size_field, 32),
                         (family.num_heads_field, 4), (family.intermediate_size_field, 64)):
        setattr(config, field, value)
    if hasattr(config, "embedding_size"):  # ELECTRA: embeddings narrower than the layers, as in the real ones
        config.embedding_size = 16
    return config


def save_tiny(family_name: str, head: str, folder: Path, vocab_dir: str, seed: int = 0) -> Path:
    """A tiny random model of ``head`` saved with its tokenizer (and a Pooling + Normalize pipeline)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(seed)
    config = tiny_config(family_name)
    if head == "classifier":
        model = AutoModelForSequenceClassification.from_config(config)
    else:
        model = FAMILIES[family_name].cls("base")(config)
    with torch.no_grad():  # non-trivial biases and norms: a graph that dropped one would show
        for name, p in model.named_parameters():
            if name.endswith("bias") or "LayerNorm" in name or "layer_norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(vocab_dir).save_pretrained(folder)
    if head == "sentence":
        add_pipeline(folder, "mean", normalize=True)
    return folder


def add_pipeline(folder: Path, mode: str, normalize: bool) -> None:
    """modules.json + 1_Pooling (+ 2_Normalize), as SentenceTransformer.save writes them."""
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
        (folder / "2_Normalize").mkdir(exist_ok=True)
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "1_Pooling").mkdir(exist_ok=True)
    flags = {f"pooling_mode_{m}": m == {"mean": "mean_tokens", "cls": "cls_token", "max": "max_tokens"}[mode]
             for m in ("cls_token", "mean_tokens", "max_tokens", "mean_sqrt_len_tokens")}
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 32, **flags}))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 64, "do_lower_case": False}))


def torch_reference(folder: Path, head: str, feed: dict) -> np.ndarray:
    """What the torch model gives, loaded afresh: hidden states or logits."""
    from transformers import AutoModel, AutoModelForSequenceClassification

    cls = AutoModelForSequenceClassification if head == "classifier" else AutoModel
    model = cls.from_pretrained(folder).eval()
    with torch.no_grad():
        out = model(**{k: torch.from_numpy(v) for k, v in feed.items()})
    return (out.logits if head == "classifier" else out.last_hidden_state).numpy()


def ort_feed(folder: Path, pairs: bool = False) -> dict:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    sess = ort.InferenceSession(str(folder / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    enc = tok(BATCH, BATCH[::-1] if pairs else None, padding=True, truncation=True, max_length=64, return_tensors="np")
    return {i.name: enc[i.name].astype(np.int64) for i in sess.get_inputs()}


@pytest.fixture(scope="module")
def vocab(tmp_path_factory):
    return tiny.save_tokenizer(tmp_path_factory.mktemp("export-tok"))


def st_encode(folder: Path, sentences) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from sentence_transformers import SentenceTransformer

        return SentenceTransformer(str(folder), device="cpu").encode(sentences, batch_size=3, convert_to_numpy=True)


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_family_and_head_exports_within_parity_and_int8_agrees(family, head, vocab, tmp_path, capsys):
    folder = save_tiny(family, head, tmp_path / f"{family}-{head}", vocab)
    report = export_onnx.export_folder(folder)
    assert report["head"] == head and report["family"] == family
    feed = ort_feed(folder, pairs=head == "classifier")
    sess = ort.InferenceSession(str(folder / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feed)))
    mask = feed["attention_mask"].astype(bool)
    assert not mask.all()  # the batch is padded
    ref = torch_reference(folder, head, feed)
    if head == "classifier":
        diff = np.abs(got["logits"] - ref).max()
    else:
        diff = np.abs(got["last_hidden_state"] - ref)[mask].max()
    if head == "sentence":  # the graph's embedding is encode's: sentence-transformers' own pooling and norm
        emb = st_encode(folder, BATCH)
        diff = max(diff, np.abs(got["sentence_embedding"] - emb).max())
        assert np.allclose(np.linalg.norm(got["sentence_embedding"], axis=1), 1, atol=1e-5)
    print(f"{family} {head}: fp32 max abs diff {diff:.2e}; int8 {report['int8']}")
    assert diff <= 1e-4
    # int8: the figures the export printed, measured again here against torch
    int8 = ort.InferenceSession(str(model_file(folder, "int8")), providers=["CPUExecutionProvider"])
    out8 = dict(zip([o.name for o in int8.get_outputs()], int8.run(None, feed)))
    if head == "classifier":
        agree = (out8["logits"].argmax(-1) == ref.argmax(-1)).mean()
        print(f"  int8 argmax agreement with torch {agree:.2f}")
        assert agree >= 0.5 and np.abs(out8["logits"] - ref).max() < 0.5
    else:
        a = export_onnx.pooled(got, feed["attention_mask"])
        b = export_onnx.pooled(out8, feed["attention_mask"])
        cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
        print(f"  int8 pooled cosine to fp32 min {cos.min():.4f}")
        assert cos.min() > 0.9  # random 32-wide weights: looser than a trained model (the MiniLM test: 0.98)
    assert report["int8"]["cosine_min"] > 0.9


def test_runner_encode_matches_sentence_transformers_and_classifier_logits(vocab, tmp_path):
    folder = save_tiny("bert", "sentence", tmp_path / "st", vocab, seed=3)
    add_pipeline(folder, "cls", normalize=False)  # another pooling, no normalisation
    export_main([str(folder), "--quantize", "none"])
    sentences = BATCH * 3
    ours = OnnxEncoder(folder).encode(sentences, batch_size=4)
    assert ours.shape == (len(sentences), 32)
    assert np.abs(ours - st_encode(folder, sentences)).max() <= 1e-4
    assert not np.allclose(np.linalg.norm(ours, axis=1), 1, atol=1e-3)  # Normalize is not in this pipeline
    clf = save_tiny("roberta", "classifier", tmp_path / "clf", vocab, seed=4)
    export_main([str(clf), "--quantize", "none"])
    logits = OnnxClassifier(clf).predict(BATCH, BATCH[::-1], batch_size=3)
    feed = OnnxClassifier(clf).tokenize(BATCH, BATCH[::-1])
    assert np.abs(logits - torch_reference(clf, "classifier", feed)).max() <= 1e-4
    # pairs from a generator: read once, not spent by the first batch
    assert np.array_equal(OnnxClassifier(clf).predict(iter(BATCH), (p for p in BATCH[::-1]), batch_size=3), logits)
    with pytest.raises(UsageError, match="texts but"):
        OnnxClassifier(clf).predict(BATCH, BATCH[:2])


@pytest.mark.parametrize("pooling", [
    {"pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": True},  # 2.x
    {"pooling_mode": "mean_sqrt_len_tokens"},  # 6.x names
    {"pooling_mode": ["max", "cls"]},
    {"word_embedding_dimension": 32}])  # no mode on: mean
def test_the_sentence_graph_pools_as_sentence_transformers_reads_the_config(vocab, tmp_path, pooling):
    """An old config's modes in the order sentence-transformers concatenates them (not the file's key order),
    6.x's names, a list of modes and none at all: the ONNX embedding is encode's."""
    folder = save_tiny("bert", "sentence", tmp_path / "st", vocab, seed=5)
    add_pipeline(folder, "mean", normalize=False)
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 32, **pooling}))
    export_main([str(folder), "--quantize", "none"])
    ours, theirs = OnnxEncoder(folder).encode(BATCH, batch_size=4), st_encode(folder, BATCH)
    assert ours.shape == theirs.shape and np.abs(ours - theirs).max() <= 1e-4


def test_a_qa_model_exports_its_encoder_and_says_the_span_head_is_left_out(vocab, tmp_path, capsys):
    from transformers import AutoTokenizer, BertForQuestionAnswering

    folder = tmp_path / "qa"
    torch.manual_seed(0)
    BertForQuestionAnswering(tiny.make_config("bert")).save_pretrained(folder)
    AutoTokenizer.from_pretrained(vocab).save_pretrained(folder)
    export_main([str(folder), "--quantize", "none"])
    err = capsys.readouterr().err
    assert "note: BertForQuestionAnswering's task head is not exported" in err
    assert json.loads((folder / "onnx" / "export.json").read_text())["head"] == "encoder"


@pytest.mark.parametrize("was_training", [True, False])
def test_the_torch_model_is_left_as_it_was_found(vocab, tmp_path, was_training):
    from transformers import AutoTokenizer

    folder = save_tiny("bert", "encoder", tmp_path / "m", vocab)
    model = FAMILIES["bert"].cls("base").from_pretrained(folder)
    model.train(was_training)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    export_onnx.export_model(model, AutoTokenizer.from_pretrained(folder), tmp_path, "encoder")
    assert (tmp_path / "model.onnx").is_file()
    assert model.training is was_training and all(m.training is was_training for m in model.modules())
    assert next(model.parameters()).device.type == "cpu"
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def _refused(capsys, argv, folder: Path, fragment: str):
    before = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else None
    with pytest.raises(SystemExit) as exc:
        export_main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    assert fragment in err[0], err[0]
    after = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else None
    assert after == before  # nothing half-written (no onnx/, no temporary folder)
    return err[0]


def test_bad_inputs_are_one_line_and_nothing_is_written(vocab, tmp_path, capsys, monkeypatch):
    folder = save_tiny("distilbert", "encoder", tmp_path / "m", vocab)
    empty = tmp_path / "empty"
    empty.mkdir()
    _refused(capsys, [str(empty)], empty, "has no config.json")
    _refused(capsys, [str(tmp_path / "missing")], tmp_path, "does not exist")
    _refused(capsys, ["bert-base-uncased"], tmp_path, "is not a local folder")  # a hub id: nothing to write into
    _refused(capsys, [str(folder), "--head", "pooler"], folder, "'pooler'")
    _refused(capsys, [str(folder), "--head", "sentence"], folder, "--head encoder")
    _refused(capsys, [str(folder), "--head", "classifier"], folder, "glue-eval --save_model")
    _refused(capsys, [str(folder), "--quantize", "int4"], folder, "choose dynamic, static, none")
    _refused(capsys, [str(folder), "--quantize", "static"], folder, "--calibration_file")
    _refused(capsys, [str(folder), "--quantize", "static", "--calibration_file", str(tmp_path / "no.txt")],
             folder, "does not exist")
    monkeypatch.setattr(export_onnx, "PARITY_LIMIT", 0.0)  # a parity failure: refused, nothing left behind
    _refused(capsys, [str(folder), "--quantize", "none"], folder, "parity failed")
    monkeypatch.undo()
    foreign = folder / "onnx"
    foreign.mkdir()
    (foreign / "model.onnx").write_bytes(b"someone else's")
    _refused(capsys, [str(folder)], foreign, "not written by distill-export")
    assert (foreign / "model.onnx").read_bytes() == b"someone else's"


def test_static_int8_from_a_text_file_and_a_second_export_replaces_ours(vocab, tmp_path):
    folder = save_tiny("electra", "encoder", tmp_path / "m", vocab)
    texts = tmp_path / "calib.txt"
    texts.write_text("\n".join(BATCH * 4) + "\n")
    report = export_onnx.export_folder(folder, quantize="static", calibration_file=str(texts))
    assert report["files"] == {"fp32": "model.onnx", "int8_static": "model_qint8_static.onnx"}
    assert report["int8_static"]["calibration_lines"] == 16 and report["int8_static"]["cosine_min"] > 0.9
    again = export_onnx.export_folder(folder, quantize="none")  # ours: replaced without --overwrite
    assert sorted(p.name for p in (folder / "onnx").iterdir()) == ["export.json", "model.onnx"]
    assert again["files"] == {"fp32": "model.onnx"}


def test_the_cli_end_to_end(vocab, tmp_path):
    folder = save_tiny("xlm-roberta", "sentence", tmp_path / "m", vocab)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    run = subprocess.run([sys.executable, "-m", "distill.export.cli", str(folder)], capture_output=True, text=True,
                         cwd=ROOT, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "max abs difference to torch" in run.stdout and "int8 (dynamic" in run.stdout
    report = json.loads((folder / "onnx" / "export.json").read_text())
    names = sorted(p.name for p in (folder / "onnx").iterdir())
    assert names == sorted(["export.json", "model.onnx", report["files"]["int8"]])
    assert report["files"]["int8"].startswith("model_qint8_")  # the name sentence-transformers' quantiser uses
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]


def test_the_training_path_never_imports_onnx():
    code = ("import sys, distill.cli, distill.train.loop, distill.objective.plan, glue_eval.cli; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('onnx', 'onnxruntime')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_sentence_transformers_loads_the_files_where_optimum_imports(vocab, tmp_path):
    pytest.importorskip("optimum.onnxruntime")  # not installable beside transformers 5 (see docs/deploy.md)
    folder = save_tiny("bert", "sentence", tmp_path / "m", vocab)
    export_onnx.export_folder(folder)
    from sentence_transformers import SentenceTransformer

    onnx_model = SentenceTransformer(str(folder), backend="onnx", model_kwargs={"file_name": "model.onnx"})
    assert np.abs(onnx_model.encode(BATCH) - st_encode(folder, BATCH)).max() <= 1e-4


@pytest.mark.slow
def test_the_real_minilm_exports_and_int8_keeps_its_embeddings(tmp_path):
    import shutil

    from distill.common.assets import minilm_dir

    folder = tmp_path / "minilm"
    shutil.copytree(minilm_dir(), folder)
    report = export_onnx.export_folder(folder)
    sentences = list(export_onnx.PARITY_SENTENCES) + BATCH
    ref = st_encode(folder, sentences)
    fp32 = OnnxEncoder(folder).encode(sentences)
    int8 = OnnxEncoder(folder, "int8").encode(sentences)
    cos = (ref * int8).sum(1)  # both normalised
    print(f"MiniLM: fp32 max abs diff {np.abs(fp32 - ref).max():.2e}; int8 cosine min {cos.min():.4f} "
          f"mean {cos.mean():.4f}; export's {report['int8']}")
    assert np.abs(fp32 - ref).max() <= 1e-4
    assert cos.min() > 0.97
