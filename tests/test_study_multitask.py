"""bench.study_multitask end to end on tiny models and two learnable keyword tasks (task spec files, as the local
tasks are): every row's cells, a table that is the mean of the cells it came from, findings computed from that
table, the per-task teachers of the same seed, and a rerun that redoes nothing."""

import json
import statistics
from pathlib import Path

import pytest

from tests import tiny
from tests.test_multitask_run import tasks  # noqa: F401 - the keyword tasks fixture

TASKS = ("city", "school")


@pytest.fixture(scope="module")
def study_mt():
    return tiny.bench_module("study_multitask")


@pytest.fixture(scope="module")
def finished(study_mt, bert_mlm_dir, vocab_dir, tasks, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("study_mt")
    encoder = tiny.save_model("bert_mlm", root / "encoder", vocab_dir, seed=3)
    specs = ",".join(str(tasks / f"{name}.json") for name in TASKS)
    argv = ["--teacher", bert_mlm_dir, "--encoder", encoder, "--tasks", specs,
            "--modes", "sum,pcgrad", "--seeds", "1,2", "--epochs", "3", "--learning_rate", "3e-3", "--batch_size", "8", "--max_seq_length", "32",
            "--precision", "fp32", "--work_dir", str(root / "work"), "--out", str(root / "out" / "mt")]
    assert study_mt.main(argv) == 0
    return root, json.loads((root / "out" / "mt.json").read_text()), argv, encoder


pytestmark = pytest.mark.slow  # 30-odd fine-tuning runs


def cell_scores(root: Path) -> dict:
    """(row, seed) -> {task: score}: glue-eval's cells (teacher, single-task rows) and the multi-task runs' own
    result.json, read from the files."""
    found = {}
    for path in (root / "work").glob("finetune-*/*/*/*/result.json"):
        record = json.loads(path.read_text())
        found.setdefault((path.parts[-4], record["settings"]["seed"]), {})[record["task"]] = record["score"]
    for path in (root / "work").glob("finetune-*/mt_*/seed*/result.json"):
        record = json.loads(path.read_text())
        seed = record["settings"]["seed"]
        found[(path.parts[-3], seed)] = {t: r["score"] for t, r in record["tasks"].items()}
    return found


def test_every_row_has_every_task_and_seed_and_the_table_is_the_mean_of_its_cells(finished):
    root, report, _, _ = finished
    names = [r["name"] for r in report["rows"]]
    assert names == ["teacher", "single", "mt_sum", "mt_pcgrad", "single_kd", "mt_sum_kd", "mt_pcgrad_kd"]
    cells = cell_scores(root)
    assert set(cells) == {(n, s) for n in names for s in (1, 2)}
    for row in report["rows"]:
        avgs = [100 * statistics.mean(cells[(row["name"], s)][t] for t in TASKS) for s in (1, 2)]
        assert row["avg"] == pytest.approx(statistics.mean(avgs))
        assert row["avg_std"] == pytest.approx(statistics.stdev(avgs))
        for t in TASKS:
            assert row["scores"][t] == pytest.approx([100 * cells[(row["name"], s)][t] for s in (1, 2)])
    md = (root / "out" / "mt.md").read_text()
    for row in report["rows"]:
        assert f"| {row['label']} | 2 |" in md
    assert (root / "out" / "mt.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_findings_are_computed_from_the_table(finished):
    root, report, _, encoder = finished
    from transformers import AutoModel, AutoModelForSequenceClassification

    by = {r["name"]: r for r in report["rows"]}
    # parameters, counted here from the models: one classifier per task against one encoder and a linear head each
    single = sum(sum(p.numel() for p in AutoModelForSequenceClassification.from_pretrained(encoder, num_labels=2)
                     .parameters()) for _ in TASKS)
    shared = AutoModel.from_pretrained(encoder)
    multi = sum(p.numel() for p in shared.parameters()) + len(TASKS) * (shared.config.hidden_size + 1) * 2
    assert by["single"]["params"] == single and by["mt_sum"]["params"] == multi
    findings = report["findings"]
    for name in ("mt_sum", "mt_pcgrad", "mt_sum_kd", "mt_pcgrad_kd", "single_kd"):
        row = by[name]
        diffs = [a - b for a, b in zip(row["avg_by_seed"], by["single"]["avg_by_seed"])]
        assert row["vs_single"] == pytest.approx([statistics.mean(diffs), statistics.stdev(diffs), 2])
        assert row["params_share"] == pytest.approx(row["params"] / single)
        plain = by.get(name.removesuffix("_kd")) if name.endswith("_kd") else None
        if plain:
            diffs = [a - b for a, b in zip(row["avg_by_seed"], plain["avg_by_seed"])]
            assert row["vs_plain"] == pytest.approx([statistics.mean(diffs), statistics.stdev(diffs), 2])
            line = next(f for f in findings if f.startswith(f"Teachers per task, {plain['label']}:"))
            assert f"{statistics.mean(diffs):+.1f} ± {statistics.stdev(diffs):.1f} points" in line
    for name in ("mt_sum", "mt_pcgrad"):
        line = next(f for f in findings if f.startswith(by[name]["label"] + ":"))
        assert f"{by[name]['vs_single'][0]:+.1f}" in line and f"{by[name]['params_share']:.2f}" in line
    kd = [by["mt_sum_kd"], by["mt_pcgrad_kd"]]  # multi-task distillation against multi-task fine-tuning alone
    above = sum(r["vs_plain"][0] > 0 for r in kd)
    (line,) = [f for f in findings if f.startswith("Target (multi-task distillation")]
    assert f"in {above} of 2 schedules" in line
    assert line.endswith(": met.") if above == 2 else f"{2 - above} schedules not above" in line
    least = min(kd, key=lambda r: r["vs_plain"][0])
    assert f"the least {least['vs_plain'][0]:+.1f}" in line and least["label"] in line
    best = max((by["mt_sum"], by["mt_pcgrad"]), key=lambda r: r["vs_single"][0])
    (target,) = [f for f in findings if f.startswith("Target (a multi-task student")]
    assert best["label"] in target and ("met" in target or "not met" in target)
    assert best["params_share"] < 0.55  # 2 tasks: one encoder instead of two
    spread = {round(r["avg"], 6) for r in report["rows"]} | {round(x, 6) for r in report["rows"] for x in r["avg_by_seed"]}
    assert len(spread) > 3  # the rows differ, so a finding that read the wrong row or seed would show


def test_the_teacher_rows_read_the_teacher_of_the_same_task_and_seed(finished):
    root, _, _, encoder = finished
    for seed in (1, 2):
        (config,) = (root / "work").glob(f"finetune-*/mt_sum_kd/seed{seed}/config.json")
        raw = json.loads(config.read_text())
        assert raw["schedule"] == "sum" and raw["distill_weights"] == {"kl": 1.0, "hard_ce": 1.0}
        for entry in raw["tasks"]:
            teacher = Path(entry["teacher"])
            record = json.loads((teacher.parent / "result.json").read_text())
            assert teacher.parts[-4] == "teacher" and record["settings"]["seed"] == seed
            assert record["task"] == Path(entry["task"]).stem
        result = json.loads((config.parent / "result.json").read_text())
        assert set(result["train"]["teachers"]) == set(TASKS) and result["settings"]["model"] == encoder
        assert result["settings"]["temperature"] == 1.0
        (plain,) = (root / "work").glob(f"finetune-*/mt_pcgrad/seed{seed}/config.json")
        assert json.loads(plain.read_text())["gradient"] == "pcgrad"
        assert not (plain.parent / "model").exists()  # the model folder goes once its size is counted
    for cell in (root / "work").glob("finetune-*/single_kd/*/*/result.json"):
        settings = json.loads(cell.read_text())["settings"]
        assert Path(settings["teacher"]).parts[-4] == "teacher"
        assert settings["distill_weights"] == {"kl": 1.0, "hard_ce": 1.0}


def test_seed_one_of_every_row_runs_first_and_the_teacher_before_its_students(study_mt, bert_mlm_dir):
    ns = study_mt.parse_args(["--teacher", bert_mlm_dir, "--encoder", bert_mlm_dir])
    plan = [(s, r["name"]) for s, r in study_mt.execution_plan(study_mt.make_rows(ns), ns)]
    assert plan[:3] == [(1, "single"), (1, "mt_sum"), (1, "teacher")]
    seeds = [s for s, _ in plan]
    assert seeds == sorted(seeds) and len(plan) == 3 * 11
    for seed in (1, 2, 3):
        order = [n for s, n in plan if s == seed]
        assert all(order.index("teacher") < order.index(n) for n in order if n.endswith("_kd"))
    modes = {r["mode"]: study_mt.multitask_config(r, 1, {"a": "a.json"}, ns) for r in study_mt.make_rows(ns)
             if r["kind"] == "multitask" and not r.get("teachers")}
    assert modes["per_task"]["schedule"] == "per_task" and modes["per_task"]["sampling"] == {"kind": "proportional"}
    assert modes["hybrid"]["schedule"]["mode"] == "hybrid" and modes["pcgrad"]["gradient"] == "pcgrad"
    assert ns.work_dir.endswith("runs-multitask") and ns.seed_list == [1, 2, 3] and ns.out == "docs/study-multitask"


def test_a_rerun_redoes_nothing_and_a_longer_seed_list_reports_what_is_done(study_mt, finished):
    root, _, argv, _ = finished
    before = {p: p.stat().st_mtime_ns for p in (root / "work").rglob("result.json")}
    assert study_mt.main(argv) == 0
    assert {p: p.stat().st_mtime_ns for p in (root / "work").rglob("result.json")} == before
    more = [a if a != "1,2" else "1,2,3" for a in argv]
    assert study_mt.main(more + ["--report_only"]) == 0
    md = (root / "out" / "mt.md").read_text()
    assert "**Incomplete:** 7 of 7 rows" in md and "bench.study_multitask" in md and "--report_only" not in md


def test_a_finished_run_is_reused_only_with_the_config_and_command_it_was_made_with(study_mt, finished, tmp_path):
    root, _, _, _ = finished
    made = sorted((root / "work").glob("finetune-*/mt_*/seed*/" + study_mt.SETTINGS_FILE))
    assert made, "every multi-task run records its config and command"
    wanted = json.loads(made[0].read_text())
    assert wanted["config"] == json.loads((made[0].parent / "config.json").read_text())
    study_mt.check_same_run(str(made[0].parent), wanted)  # the same: reused
    for part, change in (("config", {"learning_rate": 1.0}), ("argv", ["--learning_rate", "1.0"])):
        other = {**wanted, part: {**wanted[part], **change} if part == "config" else wanted[part] + change}
        with pytest.raises(SystemExit) as stop:
            study_mt.check_same_run(str(made[0].parent), other)
        assert str(made[0].parent) in str(stop.value) and f"another {part}" in str(stop.value)
    study_mt.check_same_run(str(tmp_path), wanted)  # a run finished before the file existed: taken as it is


def test_a_fresh_machine_carries_the_committed_cells_and_runs_only_the_rest(study_mt, finished, tmp_path, capsys):
    """A new work dir (another machine) with the committed report beside the run: the cells it lists are read, not
    run; a cell taken out of it is run here, and a task-KD cell brings its seed's teachers with it (their models
    are not in a report). A setting that changes a result carries nothing."""
    import shutil

    root, report, argv, _ = finished
    out = tmp_path / "out" / "mt"
    out.parent.mkdir()
    dropped = {"mt_sum_kd", "single"}  # seed 2 of these is left out of the committed report
    kept = [c for c in report["cells"] if not (c["row"] in dropped and c["seed"] == 2)]
    out.with_suffix(".json").write_text(json.dumps({**report, "cells": kept}))
    fresh = [a if a != str(root / "out" / "mt") else str(out) for a in argv]
    fresh[fresh.index("--work_dir") + 1] = str(tmp_path / "work")
    assert study_mt.main(fresh) == 0
    ran = {(row, seed) for row, seed in cell_scores(tmp_path)}
    assert ran == {("mt_sum_kd", 2), ("single", 2), ("teacher", 2)}
    again = json.loads(out.with_suffix(".json").read_text())
    assert {(c["row"], c["seed"], c["task"]) for c in again["cells"]} == {
        (c["row"], c["seed"], c["task"]) for c in report["cells"]}
    carried = {(c["row"], c["seed"], c["task"]): c["score"] for c in kept}
    local = cell_scores(tmp_path)
    for c in again["cells"]:  # each cell is the carried one, or the one run here when it ran here
        key = (c["row"], c["seed"])
        assert c["score"] == (local[key][c["task"]] if key in local else carried[key + (c["task"],)])
    ran_cells = {(c["row"], c["seed"], c["task"]) for c in again["cells"] if (c["row"], c["seed"]) in local}
    assert f"{len(again['cells']) - len(ran_cells)} of the table's cells were carried" in out.with_suffix(".md").read_text()
    here = {c["machine"] for c in again["cells"] if (c["row"], c["seed"], c["task"]) in ran_cells}
    assert len(here) == 1 and all(c["machine"] for c in again["cells"])
    shutil.rmtree(tmp_path / "work")
    other = fresh + ["--learning_rate", "5e-3"]
    assert study_mt.main(other + ["--report_only"]) == 0
    assert "nothing carried from mt.json: its settings differ in learning_rate" in capsys.readouterr().err
    assert json.loads(out.with_suffix(".json").read_text())["cells"] == []
