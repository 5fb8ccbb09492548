"""bench.study --study mpnet: 12 layers into 4 (a 12-layer MPNet teacher into 4 and 6 layers) with its own rows,
references, speed per architecture, frozen-embedding columns and a report that says what is left. Tiny MPNet
models built here stand in for all-mpnet-base-v2."""

import json
import statistics
from pathlib import Path

import pytest

from glue_eval.samples import write_glue_sample
from tests import tiny
from tests.test_train import write_corpus


@pytest.fixture(scope="module")
def study():
    return tiny.bench_module("study")


@pytest.fixture(scope="module")
def mpnet_tok(tmp_path_factory):
    return tiny.save_mpnet_tokenizer(tmp_path_factory.mktemp("mpnet_tok"))


def test_the_mpnet_study_s_default_rows(study, mpnet_tok, tmp_path):
    """The study's rows, written out: inits 1,5,8,12, 3,6,9,12 and 2,4,6,8,10,12, each copied-only and
    distilled with hid_mse+att_mse, sent_mse and the relations over the layers it was copied from (the seed
    report's map: no layer_map given, the engine's default); augmented task KD on the first init's
    hid_mse+att_mse student; a 4-layer random floor; all-MiniLM-L6-v2 and the converted L3 as references."""
    teacher = tiny.save_mpnet("mpnet_mlm", tmp_path / "teacher12", mpnet_tok, num_hidden_layers=12)
    ns = study.parse_args(["--study", "mpnet", "--teacher", teacher, "--cache_dir", str(tmp_path / "cache")])
    ns.train_precision = "fp32"
    hid, sent, rel = {"hid_mse": 1.0, "att_mse": 1.0}, {"sent_mse": 1.0}, {"qq_rel": 1.0, "kk_rel": 1.0, "vv_rel": 1.0}
    want = {"teacher": ("teacher", None, None, None, 0), "random": ("random", "1,5,8,12", None, None, 0),
            "reference-all-MiniLM-L6-v2": ("reference", None, None, None, 0),
            "reference-paraphrase-MiniLM-L3-v2": ("reference", None, None, None, 0)}
    for init in ("1,5,8,12", "3,6,9,12", "2,4,6,8,10,12"):
        name = "L" + init.replace(",", "-")
        want[f"{name}_none"] = ("student", init, None, None, 0)
        want[f"{name}_hid_mse+att_mse"] = ("student", init, hid, None, 0)
        if init == "1,5,8,12":
            want[f"{name}_hid_mse+att_mse_kd_kl+hard_ce+hid_mse+att_mse_aug2"] = (
                "student", init, hid, ["kl", "hard_ce", "hid_mse", "att_mse"], 2)
        want[f"{name}_sent_mse"] = ("student", init, sent, None, 0)
        want[f"{name}_qq_rel+kk_rel+vv_rel"] = ("student", init, rel, None, 0)
        if init == "1,5,8,12":  # beyond the study's own rows: the shipped recipe's terms, calibrated
            want[f"{name}_hid_mse+att_mse+sent_mse@cal"] = ("student", init, {**hid, **sent}, None, 0)
    rows = study.make_rows(ns)
    got = {}
    for row in rows:
        distilled = row["kind"] == "student" and row["objective"] != "none"
        settings = study.distill_settings(row, study.objective_weights(row["objective"]), ns) if distilled else {}
        if settings:
            assert settings["layer_map"] is None and settings["max_steps"] == 150 and settings["save_steps"] == 25
            assert settings["student_layers"] == [int(x) for x in row["layers"].split(",")]
            assert settings["teacher"] == teacher and settings["per_device_batch_size"] == 16
        got[row["name"]] = (row["kind"], row.get("layers"), settings.get("weights"), row.get("task_kd"),
                            row.get("augment", 0))
    assert got == want and [r["name"] for r in rows] == list(want)
    refs = {r["name"]: r["path"] for r in rows if r["kind"] == "reference"}
    assert refs == {"reference-all-MiniLM-L6-v2": "offline:all-MiniLM-L6-v2",
                    "reference-paraphrase-MiniLM-L3-v2": str(tmp_path / "cache" / "models" / "paraphrase-MiniLM-L3-v2")}
    assert ns.out == "docs/study-mpnet" and ns.work_dir == str(tmp_path / "cache" / "runs-mpnet")
    # the teacher, then the report's 1,5,8,12 rows, then the costly task-KD row after them
    plan = [(s, r["name"]) for s, r in study.execution_plan(rows, ns)]
    assert plan[:5] == [(1, "teacher"), (1, "L1-5-8-12_none"), (1, "L1-5-8-12_hid_mse+att_mse"),
                        (1, "L1-5-8-12_sent_mse"), (1, "L1-5-8-12_qq_rel+kk_rel+vv_rel")]
    assert sorted(plan) == sorted((s, n) for s in (1, 2, 3) for n in want)
    # a later seed's task-KD row right after that seed's teacher and 1,5,8,12 rows: the teacher's models it reads
    # were made on this machine (a report carries scores, not models)
    kd = "L1-5-8-12_hid_mse+att_mse_kd_kl+hard_ce+hid_mse+att_mse_aug2"
    for seed in (2, 3):
        assert plan.index((seed, kd)) == plan.index((seed, "L1-5-8-12_qq_rel+kk_rel+vv_rel")) + 1
        assert plan.index((seed, kd)) > plan.index((seed, "teacher"))
    assert plan.index((2, kd)) < plan.index((3, "teacher")) < plan.index((2, "L3-6-9-12_none"))
    # the distilled rows of the other inits last, init by init: every seed of 3,6,9,12 (the layer question)
    # before the 6-layer curve
    extra = "L1-5-8-12_hid_mse+att_mse+sent_mse@cal"  # run after every other row
    assert plan[-3:] == [(1, extra), (2, extra), (3, extra)]
    plan = plan[:-3]
    rest = plan[plan.index((1, "L3-6-9-12_hid_mse+att_mse")):]
    assert [n for _, n in rest[:9]] == ["L3-6-9-12_hid_mse+att_mse", "L3-6-9-12_sent_mse",
                                        "L3-6-9-12_qq_rel+kk_rel+vv_rel"] * 3
    assert [s for s, _ in rest[:9]] == [1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert {n for _, n in rest[9:]} == {"L2-4-6-8-10-12_hid_mse+att_mse", "L2-4-6-8-10-12_sent_mse",
                                        "L2-4-6-8-10-12_qq_rel+kk_rel+vv_rel"} and len(rest) == 18


def test_the_minilm_study_keeps_its_defaults(study):
    ns = study.parse_args([])
    ns.train_precision = "fp32"  # main() resolves --precision auto
    assert (ns.study, ns.teacher, ns.inits, ns.layer_map, ns.reference, ns.out) == (
        "minilm", "offline:all-MiniLM-L6-v2", ["2,4,6", "1,2,3", "4,5,6"], "uniform", "auto", "docs/study")
    assert ns.objective_list == ["none", "cos", "hid_mse+att_mse", "hid_mse+att_mse@cal", "qq_rel+kk_rel+vv_rel"]
    assert ns.other_objective_list == ["none"]
    assert (ns.distill_steps, ns.distill_batch, ns.augment, ns.seed_list) == (1500, 16, 4, [1, 2, 3])
    assert [r["name"] for r in study.make_rows(ns) if r["kind"] == "reference"] == ["reference"]
    assert study.distill_settings({"layers": "2,4,6"}, {"cos": 1.0}, ns)["save_steps"] == 100


@pytest.fixture(scope="module")
def finished(study, mpnet_tok, bert_base_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("study_mpnet")
    teacher = tiny.save_mpnet("mpnet_mlm", root / "teacher", mpnet_tok)
    glue = write_glue_sample(str(root / "glue"), "tsv", tasks=["sst2"], sizes=(24, 12, 8))
    argv = ["--study", "mpnet", "--teacher", teacher, "--tasks", "sst2", "--data_dir", glue, "--inits", "1,4", "1,2,4",
            "--objectives", "none,hid_mse+att_mse,sent_mse", "--other_objectives", "none", "--extra_objectives", "",
            "--task_kd",
            "--reference", bert_base_dir, "--seeds", "1", "--corpus", write_corpus(root / "corpus.txt", lines=200),
            "--distill_steps", "2", "--distill_batch", "2", "--block_size", "32", "--epochs", "1", "--batch_size", "8",
            "--max_seq_length", "32", "--precision", "fp32", "--cache_dir", str(root / "cache"),
            "--work_dir", str(root / "work"), "--data_cache", str(root / "data_cache"), "--out", str(root / "out" / "s")]
    assert study.main(argv) == 0
    return root, argv


def report(root):
    return json.loads((root / "out" / "s.json").read_text()), (root / "out" / "s.md").read_text()


@pytest.mark.slow
def test_each_architecture_gets_its_own_speed_and_the_table_agrees_with_its_cells(study, finished):
    root, argv = finished
    rec, md = report(root)
    rows = {r["name"]: r for r in rec["rows"]}
    assert list(rows) == ["teacher", "random", "reference", "L1-4_none", "L1-4_hid_mse+att_mse", "L1-4_sent_mse",
                          "L1-2-4_none"]
    ref = argv[argv.index("--reference") + 1]
    ref_config = json.loads((Path(ref) / "config.json").read_text())
    ref_arch = f"{ref_config['num_hidden_layers']}x{ref_config['hidden_size']}"
    assert set(rec["speeds"]) == {"2x32", "3x32", ref_arch}  # 2-layer students and floor, the 3-layer one, the ref
    assert {v["machine"] for v in rec["speeds"].values()} == {tiny.bench_module("carry").machine_here()}
    assert "Measured on " in md
    lines = md.split("\n")
    assert lines[lines.index(next(x for x in lines if x.startswith("| model |"))) - 1] == ""  # else no table renders
    # a row whose cells were carried and whose folder was never made here takes its depth's speed at the teacher's width
    mpnet, ns = tiny.bench_module("study_mpnet"), study.parse_args(argv)
    elsewhere = {"name": "L1-3-4_none", "kind": "student", "layers": "1,3,4", "objective": "none"}
    assert mpnet.row_speed(elsewhere, ns, {"3x32": rec["speeds"]["3x32"]}) == rec["speeds"]["3x32"]
    assert mpnet.row_speed(elsewhere, ns, {"2x32": rec["speeds"]["2x32"]}) is None
    for name, r in rows.items():
        layers = {"teacher": None, "reference": ref_arch, "L1-2-4_none": "3x32"}.get(name, "2x32")
        want = 1.0 if layers is None else rec["speeds"][layers]["batch32"]["speedup_median"]
        assert r["speed"]["batch32"] == pytest.approx(want)
        cell = json.loads(next((root / "work").glob(f"finetune-*/{name}/sst2/*seed1/result.json")).read_text())
        assert r["avg"] == pytest.approx(100 * cell["score"])
        assert f"| {r['label']} | 1 |" in md
    assert rows["L1-4_sent_mse"]["retained"] == pytest.approx(
        100 * rows["L1-4_sent_mse"]["avg"] / rows["teacher"]["avg"])
    # the study's data is not prepared here: embed-eval cannot score, so the column says so
    assert all(r["embed"] is None for r in rows.values()) and "| pending |" in md
    assert "**Status: partial.**" in md and "Frozen-embedding scores pending for 7 rows" in md


@pytest.mark.slow
def test_frozen_embedding_columns_are_the_embed_eval_averages_against_the_teacher_s(study, finished):
    root, argv = finished
    for name, avg in (("teacher", 0.5), ("L1-4_sent_mse", 0.4)):
        folder = root / "work" / "embed" / name
        folder.mkdir(parents=True, exist_ok=True)
        averages = {"classification": avg + 0.1, "clustering": avg, "retrieval": avg - 0.1, "average": avg}
        (folder / "embed_eval.json").write_text(json.dumps({"models": [{"scores": {}, "averages": averages}]}))
    assert study.main(argv + ["--report_only"]) == 0
    rec, md = report(root)
    rows = {r["name"]: r for r in rec["rows"]}
    assert rows["L1-4_sent_mse"]["embed_retained"] == pytest.approx(80.0)
    assert "| 40.0 (50.0 / 40.0 / 30.0) | 80.0 |" in md and rows["L1-4_none"]["embed"] is None


@pytest.mark.slow
def test_a_stopped_run_continues_and_the_report_says_what_is_left(study, finished):
    root, argv = finished
    before = {p: p.stat().st_mtime_ns for p in (root / "work").rglob("result.json")}
    assert study.main(argv) == 0  # nothing is redone
    assert {p: p.stat().st_mtime_ns for p in (root / "work").rglob("result.json")} == before
    more = [a if a != "1" or argv[i - 1] != "--seeds" else "1,2" for i, a in enumerate(argv)]
    assert study.main(more + ["--report_only"]) == 0
    rec, md = report(root)
    assert "7 of 14 (row, seed) fine-tuning runs done (every task of a seed; 7 of 14 single-task cells)" in md
    continue_at = md.index("```", md.index("**Status: partial.**"))
    command = md[continue_at:md.index("```", continue_at + 3)]
    assert "--seeds 1,2" in command and "--report_only" not in command and "python -m bench.study --study mpnet" in command
    assert statistics.mean([len(r["seeds"]) for r in rec["rows"]]) == 1


@pytest.mark.slow
def test_a_distillation_stopped_after_a_checkpoint_continues_from_it(study, mpnet_tok, tmp_path, monkeypatch, capfd):
    """The run killed right after its first checkpoint (step 25 of 30: the mpnet study checkpoints every 25 steps):
    the student is not taken as made, and the next run resumes at step 25 instead of starting again."""
    from distill.train import loop

    teacher = tiny.save_mpnet("mpnet_mlm", tmp_path / "teacher", mpnet_tok)
    glue = write_glue_sample(str(tmp_path / "glue"), "tsv", tasks=["sst2"], sizes=(16, 8, 8))
    argv = ["--study", "mpnet", "--teacher", teacher, "--tasks", "sst2", "--data_dir", glue, "--inits", "1,4",
            "--objectives", "none,hid_mse+att_mse", "--extra_objectives", "", "--task_kd", "--reference", "none",
            "--no_random", "--seeds", "1",
            "--corpus", write_corpus(tmp_path / "corpus.txt", lines=200), "--distill_steps", "30",
            "--distill_batch", "2", "--block_size", "32", "--epochs", "1", "--batch_size", "8", "--max_seq_length", "32",
            "--precision", "fp32", "--skip_speed", "--cache_dir", str(tmp_path / "cache"),
            "--work_dir", str(tmp_path / "work"), "--data_cache", str(tmp_path / "data_cache"),
            "--out", str(tmp_path / "out" / "s")]
    real = loop.save_checkpoint

    def killed_after_the_first(out, step, *args, **kwargs):
        real(out, step, *args, **kwargs)
        raise KeyboardInterrupt(f"killed after step {step}")

    monkeypatch.setattr(loop, "save_checkpoint", killed_after_the_first)
    with pytest.raises((KeyboardInterrupt, SystemExit)):
        study.main(argv)
    (model,) = (tmp_path / "work" / "models").glob("L1-4_hid_mse+att_mse_*")
    assert not (model / "config.json").exists()
    monkeypatch.undo()
    capfd.readouterr()
    assert study.main(argv) == 0
    assert "at step 25" in capfd.readouterr().err
    assert (model / "config.json").is_file()
    logged = [json.loads(line)["step"] for line in (model / "logs" / "train_log.jsonl").read_text().splitlines()
              if line.strip() and "step" in json.loads(line)]
    assert logged[-1] == 30


def test_the_time_left_is_the_measured_rates_times_what_is_left():
    """study_mpnet.time_lines, by hand: fine-tuning and frozen scores in proportion to non-embedding parameters
    (a depth not made yet in proportion to its layers), a distillation in proportion to 12 + 3 x student layers."""
    from types import SimpleNamespace

    from bench import study_mpnet

    rows = [{"name": "teacher", "kind": "teacher"},
            {"name": "a", "kind": "student", "layers": "1,2,3,4", "objective": "none"},
            {"name": "b", "kind": "student", "layers": "1,2,3,4", "objective": "x"},
            {"name": "c", "kind": "student", "layers": "1,2,3,4,5,6", "objective": "x"}]
    params = {"teacher": {"non_embedding": 120}, "a": {"non_embedding": 40}}
    timings = {"finetune teacher seed 1": 600.0, "finetune a seed 1": 200.0, "prepare b": 480.0, "frozen a": 80.0}
    summary = [{"name": "teacher", "seeds": [1], "embed": {"average": 1}}, {"name": "a", "seeds": [1], "embed": {}},
               {"name": "b", "seeds": [], "embed": None}, {"name": "c", "seeds": [], "embed": None}]
    ns = SimpleNamespace(seed_list=[1, 2])
    (line,) = study_mpnet.time_lines(summary, rows, {"timings": timings, "torch_threads": 1}, params, ns)
    ft = 800 / 160  # seconds per parameter over the timed cells
    left_ft = ft * (120 + 40 + 2 * 40 + 2 * 60)  # teacher and a: 1 seed each; b: 2; c (6 layers: 60): 2
    left_d = 480 / 24 * (12 + 18)  # c's distillation
    left_fz = 80 / 40 * (40 + 60)  # b's and c's frozen scores
    assert f"left about {(left_ft + left_d + left_fz) / 3600:.1f} h (fine-tuning {left_ft / 3600:.1f}" in line
    assert f"distillation {left_d / 3600:.1f}, frozen scores {left_fz / 3600:.1f})" in line
    assert "1 torch threads" in line and f"fine-tuning a seed {ft * 40 / 60:.1f} min for a 4-layer student" in line
    assert f"Spent so far {(600 + 200 + 480 + 80) / 3600:.1f} h" in line
    assert "task-KD" not in line
    # a task-KD row: its seeds left at its own measured seed minutes (the median), none until one is timed
    rows.append({"name": "k", "kind": "student", "layers": "1,2,3,4", "objective": "x", "task_kd": ["kl"]})
    summary.append({"name": "k", "seeds": [], "embed": None})
    ns.seed_list = [1, 2, 3]
    (line,) = study_mpnet.time_lines(summary, rows, {"timings": timings}, params, ns)
    assert "the task-KD rows, 1, not included until one is timed" in line
    summary[-1]["seeds"] = [1]
    (line,) = study_mpnet.time_lines(summary, rows, {"timings": {**timings, "finetune k seed 1": 1800.0}}, params, ns)
    assert f", task-KD fine-tuning {2 * 1800 / 3600:.1f}" in line and "not included" not in line


def test_the_copy_target_is_judged_seed_against_seed_when_the_rows_seeds_differ():
    """Target 2 on rows with different seeds: the gain is taken on the seeds both rows have (a third seed of the
    copied row alone, luckier or not, does not move it), in points of the teacher's average of each seed."""
    from types import SimpleNamespace

    from bench import study_mpnet

    def row(name, kind, objective, seeds, avgs, embed=None):
        return {"name": name, "label": name, "kind": kind, "layers": "1,5,8,12", "objective": objective,
                "seeds": seeds, "avg_by_seed": avgs, "avg": statistics.mean(avgs), "retained": None,
                "retained_std": 0.0, "speed": None, "embed_retained": embed}

    teacher = row("teacher", "teacher", None, [1, 2, 3], [80.0, 80.0, 80.0])
    copied = row("L1-5-8-12_none", "student", "none", [1, 2, 3], [72.0, 72.0, 79.0], embed=60.0)
    distilled = row("L1-5-8-12_hid", "student", "hid", [1, 2], [76.0, 75.2], embed=90.0)
    for r in (teacher, copied, distilled):
        r["retained"] = statistics.mean(100 * a / 80 for a in r["avg_by_seed"])
    ns = SimpleNamespace(inits=["1,5,8,12"], quick=False)
    by = {"L1-5-8-12_none": copied, "L1-5-8-12_hid": distilled}
    line = study_mpnet.target_agnostic(by, [teacher, copied, distilled], ns)[1]
    gains = [100 * (76 - 72) / 80, 100 * (75.2 - 72) / 80]  # 5.0 and 4.0 points
    assert f"{statistics.mean(gains):+.1f} ± {statistics.stdev(gains):.1f} points fine-tuned" in line
    assert "on seeds 1,2, which both rows have" in line and "+30.0 frozen" in line and line.endswith(": met.")
    # the same seeds on both rows: each row's mean, and the per-seed spread
    copied.update(seeds=[1, 2], avg_by_seed=[72.0, 72.0], retained=90.0)
    line = study_mpnet.target_agnostic(by, [teacher, copied, distilled], ns)[1]
    assert f"{distilled['retained'] - 90.0:+.1f} ± {statistics.stdev(gains):.1f} points fine-tuned" in line
    assert "which both rows have" not in line
    # target 1 names what it lacks
    distilled.update(speed={"batch32": 3.1})
    line = study_mpnet.target_agnostic(by, [teacher, copied, distilled], ns)[0]
    assert line.endswith(f"not met (short by {97 - distilled['retained']:.1f} points fine-tuned / 5.0 frozen).")


def test_distillation_gains_are_taken_seed_against_seed_on_the_seeds_both_rows_have(study):
    """The findings' "Distillation vs fine-tuning only" line, by hand: per-seed points of that seed's teacher
    average, mean ± std, on the seeds both rows have (named when the rows' seeds differ); each row's own mean,
    said to be unpaired, when they share no seed."""
    from types import SimpleNamespace

    def row(seeds, avgs):
        return {"seeds": seeds, "avg_by_seed": avgs, "avg": statistics.mean(avgs),
                "retained": statistics.mean(100 * a / t for a, t in zip(avgs, (80.0, 82.0, 84.0)))}

    teacher = row([1, 2, 3], [80.0, 82.0, 84.0])
    ns = SimpleNamespace(inits=["1,4"], objective_list=["none", "hid"], other_objective_list=["none"])
    by = {"L1-4_none": row([1, 2, 3], [70.0, 70.0, 77.0]), "L1-4_hid": row([1, 2], [74.0, 73.0])}
    (line,) = study.gain_lines(by, ns, teacher)
    gains = [100 * 4 / 80, 100 * 3 / 82]
    assert line.endswith(f"hid {statistics.mean(gains):+.1f} ± {statistics.stdev(gains):.1f} (seeds 1,2, which both "
                         "rows have).")
    by["L1-4_hid"] = row([1, 2, 3], [74.0, 73.0, 80.0])  # the same seeds: no note
    gains.append(100 * 3 / 84)
    (line,) = study.gain_lines(by, ns, teacher)
    assert line.endswith(f"hid {statistics.mean(gains):+.1f} ± {statistics.stdev(gains):.1f}.")
    by["L1-4_hid"] = {**row([1], [74.0]), "seeds": [4]}  # no seed in common: each row's own mean, said so
    (line,) = study.gain_lines(by, ns, teacher)
    assert line.endswith(f"hid {by['L1-4_hid']['retained'] - by['L1-4_none']['retained']:+.1f} (unpaired: 1 seed "
                         "against 3, none in common).")
    by["L1-4_hid"]["retained"] = None  # seeds the teacher lacks: no share yet, so no gain line (not a crash)
    assert study.gain_lines(by, ns, teacher) == []


def test_the_targets_read_every_row_that_could_meet_them_and_the_layer_question_gets_an_answer():
    """Target 1 is met when any distilled 1,5,8,12 row meets all three of its bounds (not only the row of highest
    fine-tuned share); a row whose seeds the teacher lacks is not compared; the MiniLM target is "not met so far"
    while 4-layer rows are unscored; 1,5,8,12 against 3,6,9,12 is answered by each set's best row, seed against
    seed, and settled only beyond the spread."""
    from types import SimpleNamespace

    from bench import study_mpnet

    def row(name, layers, objective, avgs, retained=None, embed_retained=None, embed=None, kind="student"):
        seeds = list(range(1, len(avgs) + 1))
        return {"name": name, "label": name, "kind": kind, "layers": layers, "objective": objective, "seeds": seeds,
                "avg_by_seed": avgs, "avg": statistics.mean(avgs), "retained_std": 0.5, "speed": {"batch32": 3.0},
                "retained": retained if retained is not None else statistics.mean(100 * a / 80 for a in avgs),
                "embed_retained": embed_retained, "embed": embed}

    teacher = row("teacher", None, None, [80.0, 80.0, 80.0], kind="teacher")
    a = row("A", "1,5,8,12", "hid", [77.76] * 3, embed_retained=94.0)  # 97.2% fine-tuned, 94% frozen
    b = row("B", "1,5,8,12", "sent", [77.68] * 3, embed_retained=96.0)  # 97.1%, 96%: meets all three
    ns = SimpleNamespace(inits=["1,5,8,12", "3,6,9,12"], quick=False, objective_list=["none", "hid", "sent"],
                         other_objective_list=["none", "hid", "sent"])
    line = study_mpnet.target_agnostic({}, [teacher, a, b], ns)[0]
    assert line.startswith("Target (best task-agnostic 1,5,8,12 row") and ": B at 97.1%" in line
    assert line.endswith(": met.")
    b["embed_retained"] = 94.5  # now neither meets it: the best fine-tuned row, and what it lacks
    line = study_mpnet.target_agnostic({}, [teacher, a, b], ns)[0]
    assert ": A at 97.2%" in line and line.endswith("not met (short by 1.0 frozen).")
    # a row with an average but no share (the teacher lacks its seeds) is left out, not a crash
    stray = {**row("C", "1,5,8,12", "rel", [79.0]), "seeds": [4], "retained": None}
    assert study_mpnet.distilled_rows([teacher, a, stray], "1,5,8,12") == [a]
    # MiniLM: not met so far while a 4-layer row has no frozen score; met stands
    ref = row("all-MiniLM-L6-v2 (outside reference)", "x", None, [70.0], kind="reference", embed={"average": 0.77})
    a["embed"], b["embed"] = {"average": 0.76}, None
    (line,) = study_mpnet.target_minilm([teacher, ref, a, b], ns)
    assert line.endswith(": not met so far (short by 1.0; 1 4-layer rows' frozen scores pending).")
    b["embed"] = {"average": 0.78}
    (line,) = study_mpnet.target_minilm([teacher, ref, a, b], ns)
    assert line.startswith("Target (best 4-layer student's frozen-embedding average >= all-MiniLM-L6-v2's): B 78.0")
    assert line.endswith(": met.")
    # the layer question: each set's best row, per-seed points of the teacher's average
    by = {"L1-5-8-12_none": row("n1", "1,5,8,12", "none", [74.0, 75.0, 76.0]),
          "L1-5-8-12_hid": row("h1", "1,5,8,12", "hid", [76.0, 77.0, 76.5]),
          "L3-6-9-12_none": row("n3", "3,6,9,12", "none", [73.0, 74.2, 74.9])}
    t975 = 4.302652729911275  # Student's t, 2 degrees of freedom, 97.5th percentile (a printed table's 4.303)

    def interval(gains):
        half = t975 * statistics.stdev(gains) / 3 ** 0.5
        return f"95% interval {statistics.mean(gains) - half:+.1f} to {statistics.mean(gains) + half:+.1f}"

    lines = study_mpnet.init_question(by, ns, teacher)  # like against like: only fine-tuned only is on both
    gains = [100 * (74.0 - 73.0) / 80, 100 * (75.0 - 74.2) / 80, 100 * (76.0 - 74.9) / 80]
    assert lines[-1] == (f"Which layers: the best row of each, 1,5,8,12 (fine-tuned only, "
                         f"{by['L1-5-8-12_none']['retained']:.1f}%) against 3,6,9,12 (fine-tuned only, "
                         f"{by['L3-6-9-12_none']['retained']:.1f}%): {statistics.mean(gains):+.1f} ± "
                         f"{statistics.stdev(gains):.1f} points of the teacher's average, seed against seed on seeds "
                         f"1,2,3: 1,5,8,12 is better ({interval(gains)}) (so far: 2 of 3 objectives not finished "
                         "on both).")
    by["L3-6-9-12_hid"] = row("h3", "3,6,9,12", "hid", [77.0, 75.0, 77.0])
    by["L3-6-9-12_sent"] = by["L1-5-8-12_sent"] = row("s", "x", "sent", [60.0, 60.0, 60.0])
    gains = [100 * (76.0 - 77.0) / 80, 100 * (77.0 - 75.0) / 80, 100 * (76.5 - 77.0) / 80]
    assert study_mpnet.init_question(by, ns, teacher)[-1].endswith(
        f"{statistics.mean(gains):+.1f} ± {statistics.stdev(gains):.1f} points of the teacher's average, seed against "
        f"seed on seeds 1,2,3: 1,5,8,12 ahead, but the {interval(gains)} holds 0: not settled.")


@pytest.mark.slow
def test_an_extra_calibrated_row_runs_after_the_studys_own_and_is_reported(study, mpnet_tok, tmp_path, capfd):
    """--extra_objectives hid_mse+att_mse+sent_mse@cal (the mpnet preset's: the shipped recipe's terms): its
    weights come from distill-train --calibrate on the row's own recipe, it is distilled and fine-tuned after every
    row of the study's own, and the report has its row and says what it is."""
    teacher = tiny.save_mpnet("mpnet_mlm", tmp_path / "teacher", mpnet_tok)
    glue = write_glue_sample(str(tmp_path / "glue"), "tsv", tasks=["sst2"], sizes=(16, 8, 8))
    argv = ["--study", "mpnet", "--teacher", teacher, "--tasks", "sst2", "--data_dir", glue, "--inits", "1,4",
            "--objectives", "none", "--extra_objectives", "hid_mse+att_mse+sent_mse@cal", "--task_kd",
            "--reference", "none", "--no_random", "--seeds", "1",
            "--corpus", write_corpus(tmp_path / "corpus.txt", lines=200), "--distill_steps", "2",
            "--distill_batch", "2", "--block_size", "32", "--epochs", "1", "--batch_size", "8", "--max_seq_length", "32",
            "--precision", "fp32", "--skip_speed", "--cache_dir", str(tmp_path / "cache"),
            "--work_dir", str(tmp_path / "work"), "--data_cache", str(tmp_path / "data_cache"),
            "--out", str(tmp_path / "out" / "s")]
    assert study.main(argv) == 0
    out = "".join(capfd.readouterr())
    extra = "L1-4_hid_mse+att_mse+sent_mse@cal"
    assert "calibrating hid_mse+att_mse+sent_mse on 8 batches" in out

    def finished(name):
        return next((tmp_path / "work").glob(f"finetune-*/{name}/sst2/*/result.json")).stat().st_mtime_ns

    assert finished("teacher") < finished("L1-4_none") < finished(extra)
    (calibration,) = (tmp_path / "work" / "models").glob(f"{extra}*.calibration/calibration.json")
    weights = json.loads(calibration.read_text())["suggested_weights"]
    assert set(weights) == {"hid_mse", "att_mse", "sent_mse"}
    rec = json.loads((tmp_path / "out" / "s.json").read_text())
    row = next(r for r in rec["rows"] if r["name"] == extra)
    assert row["avg"] is not None and row["label"].endswith("hid_mse+att_mse+sent_mse, calibrated weights")
    assert "run after all of them (--extra_objectives): hid_mse+att_mse+sent_mse@cal" in (
        tmp_path / "out" / "s.md").read_text()
