"""bench/deploy.py: the recommendation rule on hand-made figures, and --smoke end to end on tiny models."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("onnxruntime")

from bench import deploy  # noqa: E402


def test_the_recommendation_is_the_fastest_backend_within_the_budget():
    speed = {"teacher_fp32": {"b1_p50_ms": 10.0, "b32_sentences_per_s": 100.0},
             "torch_fp32": {"b1_p50_ms": 5.0, "b32_sentences_per_s": 160.0},
             "onnx_fp32": {"b1_p50_ms": 4.0, "b32_sentences_per_s": 190.0},
             "onnx_int8": {"b1_p50_ms": 2.0, "b32_sentences_per_s": 400.0},
             "torch_int8": {"b1_p50_ms": 2.5, "b32_sentences_per_s": 300.0}}
    cosine = {n: {"cosine_min": 0.99} for n in speed}
    # int8 ONNX loses 0.6 points: over the 0.5 budget, so torch int8 (0.4) wins at both batch sizes
    accuracy = {"torch_fp32": 80.0, "onnx_fp32": 80.0, "onnx_int8": 79.4, "torch_int8": 79.6}
    rec = deploy.recommend(speed, accuracy, cosine, budget=0.5, floor=0.98)
    assert rec["admissible"] == {"torch_fp32": True, "torch_int8": True, "onnx_fp32": True, "onnx_int8": False}
    assert rec["best_backend_b1"] == rec["best_backend_b32"] == "torch_int8"
    assert rec["best_vs_teacher_b1"] == pytest.approx(4.0) and rec["best_vs_teacher_b32"] == pytest.approx(3.0)
    # without a task, the cosine floor decides
    cosine["onnx_int8"] = {"cosine_min": 0.985}
    rec = deploy.recommend(speed, None, cosine, budget=0.5, floor=0.98)
    assert rec["best_backend_b1"] == "onnx_int8" and rec["best_vs_teacher_b32"] == pytest.approx(4.0)


@pytest.mark.slow
def test_the_smoke_run_writes_its_report_and_figure_lines(tmp_path, capsys):
    out = tmp_path / "deploy.json"
    assert deploy.main(["--smoke", "--out", str(out)]) == 0
    lines = dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines() if ": " in line and "|" not in line)
    for name in ("best_backend_b1", "best_vs_teacher_b1", "best_vs_teacher_b32", "onnx_fp32_max_abs_diff",
                 "int8_dev_drop_points"):
        assert name in lines
    report = json.loads(out.read_text())
    assert set(report["speed"]) >= {"teacher_fp32", "torch_fp32", "torch_int8", "onnx_fp32", "onnx_int8"}
    assert report["export"]["fp32_max_abs_diff"] <= 1e-4
    assert report["dev_prediction_flips"]["torch_fp32"] == 0 and report["dev_prediction_flips"]["onnx_fp32"] == 0
    assert report["command"].startswith("python -m bench.deploy --smoke")
    assert (tmp_path / "deploy-table.md").read_text().startswith("Machine: ")  # beside the JSON, not over a page
