"""The benches' smoke runs: every code path of bench.speed, bench.relations and bench.logit_grad on tiny shapes
(the figures mean nothing there).

A bench that no test runs breaks silently when the engine changes under it (the floor once read ``.float()`` of a
deferred vocabulary head); this runs it as a user would, in its own process.
"""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_model_flops_are_the_hand_count_of_a_bert_step(attention):
    """bench.common.counted_flops on a tiny BERT's forward and backward: 2mnk a matmul, forward and twice that
    backward, the same whether attention runs as two bmm's (eager) or the CPU's fused kernel (sdpa)."""
    import torch
    from transformers import BertConfig, BertModel

    from bench.common import counted_flops

    layers, hidden, inner, heads, batch, seq = 2, 64, 128, 4, 2, 16
    config = BertConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=inner, vocab_size=100)
    config._attn_implementation = attention
    model = BertModel(config)
    ids = torch.randint(0, 100, (batch, seq))
    tokens = batch * seq
    per_layer = 2 * tokens * (4 * hidden * hidden + 2 * hidden * inner) + 2 * 2 * batch * seq * seq * hidden
    pooler = 2 * batch * hidden * hidden  # forward only: the loss below does not read the pooled output
    want = 3 * layers * per_layer + pooler
    assert counted_flops(lambda: model(input_ids=ids).last_hidden_state.sum().backward()) == want


@pytest.mark.slow
def test_speed_bench_smoke_runs_every_path_and_prints_each_figure(tmp_path):
    out = tmp_path / "speed.json"
    page = tmp_path / "speed.md"
    done = subprocess.run([sys.executable, "-m", "bench.speed", "--smoke", "--out", str(out), "--markdown", str(page)],
                          capture_output=True, text=True, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    printed = dict(line.split(": ", 1) for line in done.stdout.splitlines() if ": " in line and " " not in line.split(":")[0])
    for figure in ("distill_step_vs_plain_masked", "distill_step_vs_plain_full", "distill_step_over_floor",
                   "prep_vs_loop", "student4_vs_teacher_inference"):
        assert float(printed[figure]) > 0, figure
        assert f"| {figure} | {float(printed[figure]):.2f} |" in page.read_text(), figure  # the page's ratio table
    import json

    report = json.loads(out.read_text())
    assert report["command"].startswith("python -m bench.speed --smoke --out speed.json")
    for entry in report["distill"]["precisions"].values():  # model FLOPs and MFU beside each step time
        v = entry["variants"]
        assert v["engine_full"]["flops"] > v["engine_masked"]["flops"] > 0  # the vocabulary head on every token
        assert v["engine_masked"]["flops"] < v["plain_masked"]["flops"]  # the plain step's heads see every token
        assert v["engine_masked"]["flops"] == v["floor_masked"]["flops"]  # no model FLOPs beyond the floor's
        assert set(entry["matmul_rates"]) == {x["mfu_dtype"] for x in v.values()}
        assert all(x["mfu"] > 0 for x in v.values())
    # the page again from the JSON alone: the same text
    from bench import speed

    again = tmp_path / "again.md"
    assert speed.main(["--render", str(out), "--markdown", str(again)]) == 0
    assert again.read_text() == page.read_text()
    assert report["machine"]["description"] in page.read_text()


def test_speed_bench_smoke_times_the_task_stage_with_and_without_length_groups():
    done = subprocess.run([sys.executable, "-m", "bench.speed", "--smoke", "--only", "task_stage"],
                          capture_output=True, text=True, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    printed = dict(line.split(": ", 1) for line in done.stdout.splitlines() if ": " in line and " " not in line.split(":")[0])
    for figure in ("task_prediction_length_groups_vs_one_forward", "task_intermediate_length_groups_vs_one_forward"):
        assert float(printed[figure]) > 0, figure
    assert "| intermediate | teacher_forward_groups |" in done.stdout


@pytest.mark.slow
@pytest.mark.parametrize("bench, args, figures", [
    ("relations", ["--quick", "--batch", "2", "--seq", "16", "--width", "64", "--relation_heads", "4",
                   "--threads", "1"], ("relation_loss_speedup", "relation_step_speedup")),
    ("logit_grad", ["--smoke", "--batch", "1", "--threads", "1"], ("head_speedup", "step_speedup")),
])
def test_two_way_benches_check_then_time_both_ways_and_write_their_report(tmp_path, bench, args, figures):
    import json

    out = tmp_path / "report.json"
    done = subprocess.run([sys.executable, "-m", f"bench.{bench}", *args, "--out", str(out)],
                          capture_output=True, text=True, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    printed = dict(line.split(": ", 1) for line in done.stdout.splitlines() if ": " in line)
    report = json.loads(out.read_text())
    for figure in figures:
        assert float(printed[figure]) == pytest.approx(report[figure]["value"], abs=0.005) and float(printed[figure]) > 0
    difference = next(v for k, v in printed.items() if k.endswith("relative_difference"))
    assert float(difference) <= 1e-4  # the two ways agreed before anything was timed
    # run as a module, and no directory of this machine in a report
    assert report["command"].startswith(f"python -m bench.{bench} ") and report["command"].endswith("--out report.json")


def test_bench_is_a_package_and_no_bench_edits_sys_path():
    """Every bench runs as ``python -m bench.NAME`` from the repository root; none reaches into ``sys.path``."""
    import ast

    assert (ROOT / "bench" / "__init__.py").is_file()
    for path in sorted((ROOT / "bench").glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        touched = [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Attribute) and node.attr == "path"
                   and isinstance(node.value, ast.Name) and node.value.id == "sys"]
        assert not touched, f"{path.name} uses sys.path at line(s) {touched}: import through the bench package"


@pytest.mark.slow
def test_speed_bench_times_the_levers_and_an_older_engine_in_one_run(tmp_path):
    """--baseline REV: REV's engine (its files from git archive) and this tree's, each in a worker process,
    alternating on one batch; the teacher levers one by one. Tiny widths: the figures mean nothing here."""
    import json

    out = tmp_path / "levers.json"
    done = subprocess.run([sys.executable, "-m", "bench.speed", "--smoke", "--only", "teacher12,baseline",
                           "--baseline", "HEAD", "--threads", "1", "--out", str(out)], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    printed = dict(line.split(": ", 1) for line in done.stdout.splitlines() if ": " in line and " " not in line.split(":")[0])
    report = json.loads(out.read_text())
    for figure in ("demo_step_vs_baseline", "teacher12_step_vs_autocast_eager", "teacher12_eager_mapped_vs_all_eager",
                   "teacher_depth_cut_vs_whole", "demo_step_malloc_tuned_vs_default"):
        assert float(printed[figure]) == pytest.approx(report["ratios"][figure], abs=0.005) and float(printed[figure]) > 0
    baseline = report["baseline"]
    # HEAD as it was when the run started (others may commit meanwhile): a full commit id of this repository
    assert baseline["baseline"] == "HEAD" and len(baseline["baseline_commit"]) == 40
    assert subprocess.run(["git", "cat-file", "-e", baseline["baseline_commit"] + "^{commit}"], cwd=ROOT).returncode == 0
    # both engines took the first step from the same weights on the same batch: the same loss, to bf16's rounding
    assert baseline["first_loss_relative_difference"] <= 1e-3
    assert set(baseline["variants"]) == {"current", "baseline", "current_malloc_tuned"}
    assert report["teacher12"]["loss"]["engine_vs_autocast_eager"] <= 1e-3
    # the headline: each engine as it runs by default (on a CPU distill-train tunes the allocator, REV did not)
    details = baseline["ratio_details"]
    assert report["ratios"]["demo_step_vs_baseline"] == details["baseline_over_shipped"]["value"]
    assert report["ratios"]["demo_step_engine_vs_baseline"] == details["baseline_over_current"]["value"]
    # --update: one section again, in place; the others kept, the rerun recorded
    done = subprocess.run([sys.executable, "-m", "bench.speed", "--smoke", "--only", "teacher12", "--threads", "1",
                           "--update", str(out), "--markdown", str(tmp_path / "page.md")], capture_output=True,
                          text=True, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    again = json.loads(out.read_text())
    assert again["baseline"] == report["baseline"] and again["teacher12"] != report["teacher12"]
    (rerun,) = again["reruns"]
    assert rerun["sections"] == ["teacher12"] and "--update levers.json" in rerun["command"]
    assert f"- Rerun: sections teacher12 by `{rerun['command']}`" in (tmp_path / "page.md").read_text()
    before = out.read_text()
    for argv, needle in ((["--quick", "--threads", "1", "--update", str(out)], "that report is a smoke run"),
                         (["--smoke", "--update", str(tmp_path / "none.json")], "not a bench.speed report")):
        done = subprocess.run([sys.executable, "-m", "bench.speed", *argv, "--only", "prep"], capture_output=True,
                              text=True, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
        assert done.returncode == 2 and needle in done.stderr.strip().splitlines()[-1], done.stderr[-2000:]
    assert out.read_text() == before  # refused before any work, nothing written


def test_speed_bench_refuses_a_baseline_that_is_no_commit_before_any_work(tmp_path):
    out = tmp_path / "never.json"
    done = subprocess.run([sys.executable, "-m", "bench.speed", "--smoke", "--only", "baseline", "--baseline",
                           "no-such-rev-24", "--out", str(out)], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("error: --baseline 'no-such-rev-24' is not a commit")
    assert not out.exists()


def test_length_groups_bench_runs_a_real_epoch_both_ways(tmp_path, vocab_dir):
    """bench.length_groups on a prepared task folder and a saved model: both variants train, one figure printed."""
    from transformers import BertForSequenceClassification

    from tests import tiny

    model = tmp_path / "model"
    BertForSequenceClassification(tiny.make_config("bert_mlm", num_labels=2)).save_pretrained(model)
    tiny.save_tokenizer(model)
    task = tmp_path / "cache" / "data" / "polarity"
    task.mkdir(parents=True)
    (task / "polarity.json").write_text(json.dumps({"name": "polarity", "train": "train.csv", "dev": "dev.csv",
                                                    "text_columns": ["text"], "label_column": "label",
                                                    "labels": ["negative", "positive"]}))
    rows = ["text,label"] + [f"{' '.join(tiny.WORDS[: 3 + 7 * (i % 4)])},{('negative', 'positive')[i % 2]}"
                             for i in range(24)]
    (task / "train.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "groups.json"
    done = subprocess.run([sys.executable, "-m", "bench.length_groups", "--model", str(model), "--cache_dir",
                           str(tmp_path / "cache"), "--rows", "24", "--batch", "8", "--rounds", "1", "--threads", "1",
                           "--out", str(out)], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    lengths = [3 + 7 * (i % 4) + 2 for i in range(24)]  # words are single tokens, plus [CLS] and [SEP]
    random.Random(0).shuffle(lengths)  # the bench's documented shuffle, then batches of 8 padded to their longest
    padded = sum(8 * max(lengths[s:s + 8]) for s in range(0, 24, 8))
    assert report["real_token_share"] == pytest.approx(sum(lengths) / padded)
    assert f"length_groups_vs_one_forward: {report['length_groups_vs_one_forward']['value']:.2f}" in done.stdout


def test_a_reports_command_names_no_folder_of_the_machine_it_ran_on(tmp_path):
    """bench.common.command_line: paths inside the repository relative to it; a scratch folder as SCRATCH_DIR; an
    output file by its name; other paths under ~ or by name; everything else as given."""
    from bench.common import ROOT, command_line

    home = Path.home() / ".cache" / "m"
    got = command_line("bench.deploy", ["--work", str(tmp_path), "--out", str(ROOT / "docs" / "d.json"),
                                        f"--student={home}", "--teacher", str(tmp_path / "t"), "--threads", "2",
                                        "--markdown", str(tmp_path / "page.md"), "positional"])
    assert got == ("python -m bench.deploy --work SCRATCH_DIR --out docs/d.json '--student=~/.cache/m' --teacher t "
                   "--threads 2 --markdown page.md positional")
    assert str(tmp_path) not in got and str(Path.home()) not in got


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="on a GPU machine the script runs for minutes")
def test_the_gpu_check_refuses_a_machine_without_cuda_in_one_line(tmp_path):
    out = tmp_path / "out"
    done = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), str(out)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode != 0
    assert done.stderr.strip().splitlines()[-1].startswith("error: no CUDA device here")
    assert not out.exists()  # nothing written
