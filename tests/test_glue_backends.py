"""glue-eval --backend: a fine-tuned classifier evaluated in torch and in its ONNX exports, side by side."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")

from distill.export.onnx import export_folder  # noqa: E402
from glue_eval.cli import main as glue_main  # noqa: E402
from tests import tiny  # noqa: E402
from tests.test_export import save_tiny  # noqa: E402

WORDS = tiny.WORDS


def write_task(folder, n=60, seed=0):
    """A local two-class task spec over random sentences of the tiny vocabulary (labels at random)."""
    rng = np.random.default_rng(seed)
    rows = [(" ".join(rng.choice(WORDS, size=rng.integers(2, 12))), int(rng.integers(0, 2))) for _ in range(n)]
    for split in ("train", "dev"):
        with open(folder / f"{split}.csv", "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["sentence", "label"])
            w.writerows(rows)
    spec = {"name": "toy", "train": "train.csv", "dev": "dev.csv", "text_columns": ["sentence"],
            "label_column": "label", "labels": ["0", "1"], "metric": "accuracy"}
    (folder / "toy.json").write_text(json.dumps(spec))
    return str(folder / "toy.json"), rows


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    """A 2-label bert classifier (random weights stand in for fine-tuned ones), exported with int8."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    root = tmp_path_factory.mktemp("glue-backends")
    (root / "tok").mkdir()
    vocab = tiny.save_tokenizer(root / "tok")
    folder = root / "clf"
    torch.manual_seed(0)
    save_tiny("bert", "classifier", folder, vocab)
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2, ignore_mismatched_sizes=True)
    with torch.no_grad():  # a head that separates the rows: the accuracy is not a coin's
        model.classifier.weight.mul_(30)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(vocab).save_pretrained(folder)
    export_folder(folder)
    return folder


def test_torch_onnx_and_int8_side_by_side(classifier, tmp_path, capsys):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    spec, rows = write_task(tmp_path)
    out = tmp_path / "out"
    assert glue_main(["--backend", "torch,onnx,onnx-int8", "--model", str(classifier), "--task", spec,
                      "--output_dir", str(out), "--batch_size", "7"]) == 0
    records = {r["backend"]: r for r in json.loads((out / "backends" / "toy.json").read_text())["results"]}
    # independent: the torch model run row by row (no padding), accuracy counted here
    tok = AutoTokenizer.from_pretrained(classifier)
    model = AutoModelForSequenceClassification.from_pretrained(classifier).eval()
    with torch.no_grad():
        preds = [int(model(**tok(s, return_tensors="pt")).logits.argmax()) for s, _ in rows]
    accuracy = float(np.mean([p == y for p, (_, y) in zip(preds, rows)]))
    print(capsys.readouterr().out)
    assert records["torch"]["dev"]["validation"]["accuracy"] == pytest.approx(accuracy)
    assert records["onnx"]["dev"]["validation"]["accuracy"] == pytest.approx(accuracy)
    assert abs(records["onnx-int8"]["score"] - accuracy) <= 0.1  # int8 may flip a close row or a few
    md = (out / "backends.md").read_text()
    assert "| toy | " in md and "ONNX Runtime int8" in md and "onnx-int8: " in md
    assert not (out / "toy").exists()  # outside the grid's OUT/<task>/<cell> layout: glue-eval report unaffected


def test_bad_backend_inputs_are_one_line(classifier, tmp_path, capsys, vocab_dir, bert_base_dir):
    spec, _ = write_task(tmp_path)
    cases = [(["--backend", "tensorrt"], "choose among torch, onnx, onnx-int8"),
             (["--backend", "onnx", "--model", bert_base_dir], "not a fine-tuned classifier")]
    three = save_tiny("bert", "classifier", tmp_path / "three", vocab_dir)
    cases.append((["--backend", "torch", "--model", str(three)], "has 3 labels but toy has 2"))
    unexported = shutil.copytree(classifier, tmp_path / "unexported", ignore=shutil.ignore_patterns("onnx"))
    cases.append((["--backend", "onnx", "--model", str(unexported)], "distill-export"))
    for extra, fragment in cases:
        argv = ["--model", str(classifier), "--task", spec, "--output_dir", str(tmp_path / "o"), *extra]
        with pytest.raises(SystemExit) as exc:
            glue_main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert exc.value.code == 2 and len(err) == 1 and fragment in err[0], err
    assert not (tmp_path / "o").exists()
