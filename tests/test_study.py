"""bench.study end to end on tiny models, through the path hub users take: any teacher folder, GLUE tasks
from a GLUE folder (classification and regression), and a table that agrees with the cells it came from."""

import json
import shutil
import statistics
from pathlib import Path

import pytest
import torch

from glue_eval.samples import write_glue_sample
from tests import tiny
from tests.test_train import write_corpus

pytestmark = pytest.mark.slow  # end to end through subprocesses and real runs




@pytest.fixture(scope="module")
def study():
    return tiny.bench_module("study")


@pytest.fixture(scope="module")
def finished(study, bert_mlm_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    glue = write_glue_sample(str(root / "glue"), "tsv", tasks=["sst2", "stsb"], sizes=(24, 12, 8))
    argv = ["--teacher", bert_mlm_dir, "--tasks", "sst2,stsb", "--data_dir", glue, "--inits", "1,3",
            "--objectives", "none,hid_mse+att_mse,hid_mse+att_mse@cal,qq_rel+kk_rel+vv_rel", "--relation_heads", "4",
            "--augment", "1", "--reference", "none", "--seeds", "1,2",
            "--corpus", write_corpus(root / "corpus.txt", lines=200), "--distill_steps", "2", "--distill_batch", "2",
            "--block_size", "32", "--epochs", "1", "--batch_size", "8", "--max_seq_length", "32",
            "--precision", "fp32", "--skip_speed", "--work_dir", str(root / "work"),
            "--task_kd", "1,3:hid_mse+att_mse", "1,3:hid_mse+att_mse:kl+hard_ce+hid_mse+att_mse",
            "1,3:qq_rel+kk_rel+vv_rel:kl+hard_ce+hid_mse+att_mse:aug",
            "--data_cache", str(root / "cache"), "--out", str(root / "out" / "study")]
    assert study.main(argv) == 0
    return root, json.loads((root / "out" / "study.json").read_text()), argv


def cells(root: Path) -> dict:
    """(row, task, seed) -> the cell's own result.json."""
    found = {}
    for path in (root / "work").glob("finetune-*/*/*/*/result.json"):
        record = json.loads(path.read_text())
        found[(path.parts[-4], record["task"], record["settings"]["seed"])] = record
    return found


def test_every_row_is_fine_tuned_on_every_task_and_seed(finished):
    root, report, _ = finished
    rows = [r["name"] for r in report["rows"]]
    assert rows == ["teacher", "random", "L1-3_none", "L1-3_hid_mse+att_mse_map2-4",
                    "L1-3_hid_mse+att_mse_map2-4_kd", "L1-3_hid_mse+att_mse_map2-4_kd_kl+hard_ce+hid_mse+att_mse",
                    "L1-3_hid_mse+att_mse@cal_map2-4", "L1-3_qq_rel+kk_rel+vv_rel",
                    "L1-3_qq_rel+kk_rel+vv_rel_kd_kl+hard_ce+hid_mse+att_mse_aug1"]
    assert set(cells(root)) == {(r, t, s) for r in rows for t in ("sst2", "stsb") for s in (1, 2)}
    md = (root / "out" / "study.md").read_text()
    for r in report["rows"]:
        assert f"| {r['label']} | 2 |" in md
    assert (root / "out" / "study.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_table_is_the_mean_of_the_cells_and_percent_is_against_the_same_seed_teacher(finished):
    root, report, _ = finished
    by_cell = cells(root)
    teacher = {s: statistics.mean(by_cell[("teacher", t, s)]["score"] for t in ("sst2", "stsb")) for s in (1, 2)}
    for row in report["rows"]:
        avgs = {s: statistics.mean(by_cell[(row["name"], t, s)]["score"] for t in ("sst2", "stsb")) for s in (1, 2)}
        assert row["avg"] == pytest.approx(100 * statistics.mean(avgs.values()))
        assert row["avg_std"] == pytest.approx(100 * statistics.stdev(avgs.values()))
        assert row["retained"] == pytest.approx(statistics.mean(100 * avgs[s] / teacher[s] for s in (1, 2)))
        for t in ("sst2", "stsb"):
            assert row["scores"][t] == pytest.approx([100 * by_cell[(row["name"], t, s)]["score"] for s in (1, 2)])


def test_the_distilled_student_targets_uniform_teacher_layers_and_kd_uses_the_same_seed_teacher(finished):
    root, report, _ = finished
    (model,) = (root / "work" / "models").glob("L1-3_hid_mse+att_mse_map2-4_s*")
    config = json.loads((model / "distill_config.json").read_text())
    assert config["student_layers"] == [1, 3] and config["layer_map"] == [[1, 2], [2, 4]]
    assert config["max_steps"] == 2 and config["block_size"] == 32
    by_cell = cells(root)
    for (row, task, seed), record in by_cell.items():
        settings = record["settings"]
        soft = "out_mse" if task == "stsb" else "kl"
        if "_kd" in row and "qq_rel" in row:  # relations student, augmented TinyBERT stage over the uniform map
            assert settings["distill_weights"] == {soft: 1.0, "hard_ce": 1.0, "hid_mse": 1.0, "att_mse": 1.0}
            assert settings["student_layers"] == "2,4" and settings["augment"]["variants"] == 1
            train = record["train"]
            assert train["augmented"]["examples"] == train["original_examples"] == 24  # one variant per example
            assert train["examples"] == 48
        elif "_kd" in row:
            teacher_model = Path(settings["teacher"])
            assert teacher_model.name == "model" and (teacher_model / "config.json").is_file()
            # the teacher fine-tuned on this task with this seed
            assert json.loads((teacher_model.parent / "result.json").read_text()) == by_cell[("teacher", task, seed)]
            assert settings["model"] == str(model)
            soft = "out_mse" if task == "stsb" else "kl"
            if row.endswith("_kd"):
                assert settings["distill_weights"] == {soft: 1.0, "hard_ce": 1.0}
                assert settings["student_layers"] is None
            else:  # TinyBERT's whole second stage, over the row's (uniform) layer map
                assert settings["distill_weights"] == {soft: 1.0, "hard_ce": 1.0, "hid_mse": 1.0, "att_mse": 1.0}
                assert settings["student_layers"] == "2,4"
        else:
            assert settings["teacher"] is None


def test_the_calibrated_row_distils_with_the_weights_its_calibration_suggests(finished):
    root, report, _ = finished
    (cal,) = (root / "work" / "models").glob("L1-3_hid_mse+att_mse@cal_map2-4_*.calibration")
    record = json.loads((cal / "calibration.json").read_text())
    terms = record["terms"]
    assert set(terms) == {"hid_mse", "att_mse"} and record["batches"] == 8
    # equal gradient shares (w_k / g_k) * sum_j w_j g_j / sum_j w_j, from the calibration's own norms (weights 1)
    pull = sum(t["grad_norm"] for t in terms.values()) / len(terms)
    for k, t in terms.items():
        assert record["suggested_weights"][k] == pytest.approx(pull / t["grad_norm"], rel=1e-3)
    (model,) = (root / "work" / "models").glob("L1-3_hid_mse+att_mse@cal_map2-4_*_cal8")
    config = json.loads((model / "distill_config.json").read_text())
    assert config["weights"] == record["suggested_weights"] and config["layer_map"] == [[1, 2], [2, 4]]
    assert report["calibrations"]["L1-3_hid_mse+att_mse@cal_map2-4"] == record
    md = (root / "out" / "study.md").read_text()
    assert json.dumps(record["suggested_weights"]) in md


def test_the_relations_row_distils_the_three_relation_terms(finished, bert_mlm_dir):
    """MiniLMv2's terms read the last layer's queries, keys and values only. So the distilled student's last layer
    (a copy of teacher layer 3) must have moved in its query, key and value weights, each of which only its own term
    reaches, and kept everything after the attention scores bit for bit as the teacher has it: the attention output,
    the feed-forward block, their LayerNorms and the MLM head's transform, which a cos, hid_mse, att_mse, ce or mlm
    term would have moved (weight decay is 0)."""
    from safetensors.torch import load_file

    root, _, _ = finished
    (model,) = (root / "work" / "models").glob("L1-3_qq_rel+kk_rel+vv_rel_*_rh4")
    config = json.loads((model / "distill_config.json").read_text())
    assert config["relation_heads"] == 4 and config["weight_decay"] == 0.0
    student = load_file(str(model / "model.safetensors"))
    teacher = load_file(str(Path(bert_mlm_dir) / "model.safetensors"))
    last, copied = "bert.encoder.layer.1.", "bert.encoder.layer.2."  # student layer 2 <- teacher layer 3
    after_scores = [k for k in student if k.startswith(last) and not k.startswith(last + "attention.self.")]
    after_scores += [k for k in student if k.startswith("cls.predictions.transform.")]
    assert len(after_scores) == 10 + 4  # attention output dense + LN, intermediate, output dense + LN; transform
    for key in after_scores:
        assert torch.equal(student[key], teacher[key.replace(last, copied)]), f"{key} moved"
    for part in ("query", "key", "value"):  # qq_rel, kk_rel, vv_rel: each reaches its own projection only
        key = f"{last}attention.self.{part}.weight"
        assert not torch.equal(student[key], teacher[key.replace(last, copied)]), f"{key} did not move"


def test_each_row_reports_its_own_measured_compute(finished):
    root, report, argv = finished
    state = json.loads((root / "work" / "state.json").read_text())["timings"]
    for row in report["rows"]:
        c = row["compute"]
        if row["kind"] == "student" and row["objective"] != "none":
            assert c["distill_tokens"] == 2 * 2 * 32  # steps x batch x block size
            assert c["distill_min"] == pytest.approx(state[f"prepare {row.get('model', row['name'])}"] / 60)
        else:
            assert "distill_tokens" not in c
        runs = [state[k] for k in (f"finetune {row['name']} seed {s}" for s in (1, 2)) if k in state]
        assert c["finetune_min_per_seed"] == (pytest.approx(statistics.mean(runs) / 60) if runs else None)


def test_a_report_counts_the_compute_of_its_own_rows_only(study):
    """The work cache may hold pieces of rows another command asked for (an extra --task_kd row): a report's
    compute line, its JSON and its projected run count only the rows it shows."""
    rows = [{"name": "teacher"}, {"name": "L2-4-6_cos"}, {"name": "L2-4-6_cos_kd_kl+hard_ce_aug4", "model": "L2-4-6_cos"},
            {"name": "L1-2-3_hid_mse+att_mse_kd_kl+hard_ce", "model": "L1-2-3_hid_mse+att_mse"}]
    timings = {"finetune teacher seed 1": 10.0, "prepare L2-4-6_cos": 20.0,
               "finetune L2-4-6_cos_kd_kl+hard_ce_aug4 seed 1": 30.0, "prepare L1-2-3_hid_mse+att_mse": 35.0,
               "prepare L2-4-6_other": 40.0, "finetune L2-4-6_other seed 1": 50.0,
               "finetune L2-4-6_cos_kd_kl+hard_ce seed 1": 60.0, "finetune L1-2-3_hid_mse+att_mse seed 1": 70.0}
    # the base L1-2-3 row is not shown: its distillation counts (the KD row starts from it), its fine-tuning not
    assert study.row_timings(rows, timings) == {k: v for k, v in timings.items() if "other" not in k
                                                and k != "finetune L2-4-6_cos_kd_kl+hard_ce seed 1"
                                                and k != "finetune L1-2-3_hid_mse+att_mse seed 1"}


def test_a_rerun_redoes_nothing(study, finished):
    root, _, argv = finished
    before = {p: p.stat().st_mtime_ns for p in (root / "work").rglob("result.json")}
    assert study.main(argv) == 0
    assert {p: p.stat().st_mtime_ns for p in (root / "work").rglob("result.json")} == before


def test_a_teacher_cell_finished_without_its_model_is_redone_once_kd_rows_need_it(study, finished):
    root, _, argv = finished
    (cell,) = (root / "work").glob("finetune-*/teacher/sst2/*seed1")
    shutil.rmtree(cell / "model")
    others = {p: p.stat().st_mtime_ns for p in (root / "work").rglob("result.json") if p.parent != cell}
    assert study.main(argv + ["--no_carry"]) == 0  # the work dir alone (the report would carry every cell)
    assert (cell / "model" / "config.json").is_file()
    assert {p: p.stat().st_mtime_ns for p in others} == others  # nothing else was redone


def test_task_kd_rows_follow_the_flag(study, bert_mlm_dir):
    base = ["--teacher", bert_mlm_dir, "--inits", "1,3", "2,4", "--objectives", "none,cos,att_mse",
            "--other_objectives", "same"]
    names = lambda ns: [r["name"] for r in study.make_rows(ns) if r.get("task_kd")]  # noqa: E731
    assert names(study.parse_args(base)) == []  # the default pairs the first init with hid_mse+att_mse: absent here
    assert names(study.parse_args(base + ["--task_kd", "2,4:cos", "1,3:att_mse", "2,4:cos:kl+hid_mse"])) == [
        "L1-3_att_mse_map2-4_kd", "L2-4_cos_kd", "L2-4_cos_kd_kl+hid_mse"]
    assert names(study.parse_args(base + ["--objectives", "none,hid_mse+att_mse", "--task_kd"])) == []
    assert names(study.parse_args(base + ["--task_kd", "2,4:cos:kl:aug", "--augment", "3"])) == ["L2-4_cos_kd_kl_aug3"]
    # the other inits have only the fine-tuned row by default, so a task-KD row there is refused
    for bad in ("3,4:cos", "2,4:none", "2,4:cos:kl+mlm", "2,4:cos:kl:augx"):
        with pytest.raises(SystemExit):
            study.parse_args(base + ["--task_kd", bad])
    with pytest.raises(SystemExit):
        study.parse_args(base[:-2] + ["--task_kd", "2,4:cos"])
    for bad in ("none,cos@cal", "none,none@cal", "none,foo"):  # one term has nothing to balance
        with pytest.raises(SystemExit):
            study.parse_args(base + ["--objectives", bad])


def test_the_default_rows(study, vocab_dir, tmp_path):
    """The study that runs with no row flags, against its documented defaults written out here: inits 2,4,6, 1,2,3
    and 4,5,6; the first fine-tuned only and distilled with cos, hid_mse+att_mse (also calibrated) and the relations;
    task KD (kl+hard_ce+hid_mse+att_mse) on the hid_mse+att_mse and relations students, the relations one again on 4
    augmented variants; the other inits fine-tuned only; a random floor. A 12-layer teacher makes the uniform map
    (student layer i -> teacher layer 4i) differ from the init, so a row that distils over the wrong layers shows."""
    teacher = tiny.save_model("bert_mlm", tmp_path / "teacher12", vocab_dir, num_hidden_layers=12)
    ns = study.parse_args(["--teacher", teacher, "--cache_dir", str(tmp_path / "cache")])
    ns.train_precision = "fp32"  # main() resolves --precision auto here; no row depends on it
    uniform = [[1, 4], [2, 8], [3, 12]]
    hid, rel, kd = {"hid_mse": 1.0, "att_mse": 1.0}, {"qq_rel": 1.0, "kk_rel": 1.0, "vv_rel": 1.0}, \
        ["kl", "hard_ce", "hid_mse", "att_mse"]
    # name: (kind, init, weights distill-train gets (None: no distillation), its layer map, task-KD terms, variants)
    want = {
        "teacher": ("teacher", None, None, None, None, 0),
        "random": ("random", "2,4,6", None, None, None, 0),
        "L2-4-6_none": ("student", "2,4,6", None, None, None, 0),
        "L2-4-6_cos": ("student", "2,4,6", {"cos": 1.0}, None, None, 0),
        "L2-4-6_hid_mse+att_mse_map4-8-12": ("student", "2,4,6", hid, uniform, None, 0),
        "L2-4-6_hid_mse+att_mse_map4-8-12_kd_kl+hard_ce+hid_mse+att_mse": ("student", "2,4,6", hid, uniform, kd, 0),
        "L2-4-6_hid_mse+att_mse@cal_map4-8-12": ("student", "2,4,6", hid, uniform, None, 0),  # weights: calibrated
        "L2-4-6_qq_rel+kk_rel+vv_rel": ("student", "2,4,6", rel, None, None, 0),
        "L2-4-6_qq_rel+kk_rel+vv_rel_kd_kl+hard_ce+hid_mse+att_mse": ("student", "2,4,6", rel, None, kd, 0),
        "L2-4-6_qq_rel+kk_rel+vv_rel_kd_kl+hard_ce+hid_mse+att_mse_aug4": ("student", "2,4,6", rel, None, kd, 4),
        "L1-2-3_none": ("student", "1,2,3", None, None, None, 0),
        "L4-5-6_none": ("student", "4,5,6", None, None, None, 0),
    }
    rows = study.make_rows(ns)
    got = {}
    for row in rows:
        distilled = row["kind"] == "student" and row["objective"] != "none"
        settings = study.distill_settings(row, study.objective_weights(row["objective"]), ns) if distilled else {}
        if settings:
            assert settings["student_layers"] == [int(x) for x in row["layers"].split(",")]
        got[row["name"]] = (row["kind"], row.get("layers"), settings.get("weights"), settings.get("layer_map"),
                            row.get("task_kd"), row.get("augment", 0))
    assert got == want
    assert [r["name"] for r in rows] == list(want)  # the table's order: cheap rows after the teacher
    # a task-KD row fine-tunes the distilled folder of its base row, over the same uniform map (hid_mse/att_mse)
    folders = {r["name"]: study.model_folder(r, ns) for r in rows if r["kind"] != "teacher"}
    for r in (r for r in rows if r.get("task_kd")):
        assert folders[r["name"]] == folders[r["model"]] and not r["model"].endswith("_kd")
        assert (r.get("loss_layers") or study.loss_targets(r["layers"], ns)) == [t for _, t in uniform]
    assert len({f for n, f in folders.items() if "_kd" not in n}) == len(want) - 1 - 3  # the rest: a folder each


def test_clipping_texts_to_max_seq_length_words_keeps_every_token_the_model_reads(study, vocab_dir):
    from transformers import BertTokenizerFast

    tok = BertTokenizerFast.from_pretrained(vocab_dir)
    texts = ["one two, three-four  five\tsix seven eight nine ten eleven", "a b", "  lead x,y,z w v u t s r q p o"]
    for text in texts:
        for n in (1, 3, 5, 8):
            clipped = study.clip_words(text, n)
            assert text.startswith(clipped) and len(clipped.split()) == min(n, len(text.split()))
            full = tok(text, truncation=True, max_length=n + 2)["input_ids"]  # n tokens plus [CLS] and [SEP]
            assert tok(clipped, truncation=True, max_length=n + 2)["input_ids"] == full


def test_the_report_names_paths_under_the_cache_and_home_without_the_machine_s_directories(study, tmp_path,
                                                                                            monkeypatch):
    from types import SimpleNamespace

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    ns = SimpleNamespace(cache_dir=str(tmp_path / "home" / ".cache" / "distill" / "study"))
    assert study.shown_path(ns.cache_dir + "/corpus/agnostic.txt", ns) == "CACHE/corpus/agnostic.txt"
    assert study.shown_path(str(tmp_path / "home" / "wiki.txt"), ns) == "~/wiki.txt"
    assert study.shown_path(str(tmp_path / "home-other" / "x.txt"), ns) == str(tmp_path / "home-other" / "x.txt")
    assert study.shown_path("offline:wikipedia-extract", ns) == "offline:wikipedia-extract"
    assert study.shown_path(3, ns) == 3


def test_remeasure_distill_records_each_recipe_s_speed_and_projects_the_whole_run(study, finished):
    root, _, argv = finished
    assert study.main(argv + ["--remeasure_distill", "4"]) == 0
    state = json.loads((root / "work" / "state.json").read_text())
    speeds = state["distill_speed"]
    # one measurement per set of terms and depth: the calibrated row runs its objective's terms
    hid, rel = "hid_mse+att_mse, 2 layers", "qq_rel+kk_rel+vv_rel, 2 layers"
    assert set(speeds) == {hid, rel}
    assert all(v["tokens_per_s"] > 0 and v["steps"] == 4 and v["intervals"] == 3 for v in speeds.values())
    out = json.loads((root / "out" / "study.json").read_text())
    tokens = 2 * 2 * 32  # --distill_steps x --distill_batch x --block_size
    # three distilled folders: hid_mse+att_mse, its @cal row, the relations row (task-KD rows reuse them)
    want = 2 * tokens / speeds[hid]["tokens_per_s"] + tokens / speeds[rel]["tokens_per_s"]
    assert out["projected_run"]["distill_s"] == pytest.approx(want) and out["projected_run"]["unmeasured"] == []
    finetune = sum(v for k, v in state["timings"].items() if k.startswith("finetune"))
    assert out["projected_run"]["finetune_s"] == pytest.approx(finetune)
    assert "--remeasure_distill N" in (root / "out" / "study.md").read_text()
    assert "--remeasure_distill" not in out["command"]  # the run's command, not the measurement's
    assert not any((root / "work" / "distill-speed").iterdir())
    # a figure taken under other settings is not used: the rows it would price are named instead
    assert study.main(argv + ["--report_only", "--block_size", "16"]) == 0
    out = json.loads((root / "out" / "study.json").read_text())
    assert out["projected_run"]["distill_s"] == 0 and len(out["projected_run"]["unmeasured"]) == 3


def test_remeasure_distill_needs_a_few_steps(study):
    with pytest.raises(SystemExit):
        study.parse_args(["--remeasure_distill", "2"])


def test_teacher_fp32_distils_in_a_work_dir_and_folder_of_its_own(study, bert_mlm_dir):
    """--teacher_fp32 (what the bf16 teacher moves): distill-train gets teacher_fp32, and neither the distilled
    folders nor the fine-tuned cells can be mistaken for the bf16 teacher's."""
    base = ["--teacher", bert_mlm_dir, "--inits", "1,3", "--objectives", "hid_mse+att_mse", "--cache_dir", "/c"]
    plain, fp32 = study.parse_args(base), study.parse_args(base + ["--teacher_fp32"])
    plain.train_precision = fp32.train_precision = "bf16"  # what main() sets from --precision
    (row,) = [r for r in study.make_rows(fp32) if r["kind"] == "student" and r["objective"] != "none"
              and not r.get("task_kd")]
    assert fp32.work_dir == plain.work_dir + "-t32" and fp32.out == plain.out + "-t32"  # never over the report
    assert study.model_folder(row, fp32).endswith("_t32")
    assert study.distill_settings(row, {"hid_mse": 1.0}, fp32)["teacher_fp32"] is True
    assert "teacher_fp32" not in study.distill_settings(row, {"hid_mse": 1.0}, plain)


def test_a_quick_run_writes_beside_the_studys_report_not_over_it(study):
    for name in ("minilm", "mpnet"):
        full, quick = study.parse_args(["--study", name]), study.parse_args(["--study", name, "--quick"])
        assert quick.out == full.out + "-quick" and quick.work_dir == full.work_dir + "-quick"
    assert study.parse_args(["--quick", "--out", "elsewhere"]).out == "elsewhere"
