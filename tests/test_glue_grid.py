"""A 2 x 2 grid on a tiny model: completes, resumes after a kill without redoing cells, and reports."""

import json
import os
import statistics
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import glue_eval.grid as grid_module
from glue_eval.cli import main
from glue_eval.samples import write_glue_sample

pytestmark = pytest.mark.slow  # end to end through subprocesses and real runs


GLUE_NAMES = ("CoLA", "SST-2", "MRPC", "STS-B", "QQP", "MNLI", "QNLI", "RTE", "WNLI")


@pytest.fixture(scope="module")
def finished_grid(bert_mlm_dir, tmp_path_factory):
    """Run the grid once with a kill after two cells, then resume it; record what each run did."""
    root = tmp_path_factory.mktemp("grid")
    data = write_glue_sample(str(root / "glue"), "tsv", tasks=["mnli", "stsb"], sizes=(16, 8, 6))
    spec = {"tasks": ["mnli", "STS-B"], "learning_rate": [1e-4, 1e-3], "per_device_train_batch_size": [8, 16],
            "seed": [7], "num_train_epochs": 1}
    (root / "grid.json").write_text(json.dumps(spec))
    out = root / "out"
    argv = ["--model", bert_mlm_dir, "--grid", str(root / "grid.json"), "--data_dir", data, "--output_dir", str(out),
            "--use_cpu", "--predict_test", "--disable_tqdm", "true"]

    calls = []
    real = grid_module.finetune

    def counting(task, data, tokenizer, args, glue, kill_at=None):
        calls.append(args.output_dir)
        if len(calls) == kill_at:
            raise KeyboardInterrupt  # killed in the middle of the third cell
        return real(task, data, tokenizer, args, glue)

    mp = pytest.MonkeyPatch()
    mp.setattr(grid_module, "finetune", lambda *a: counting(*a, kill_at=3))
    with pytest.raises(KeyboardInterrupt):
        main(argv)
    first = {p: p.stat().st_mtime_ns for p in out.rglob("result.json")}
    first_calls = list(calls)

    calls.clear()
    mp.setattr(grid_module, "finetune", lambda *a: counting(*a))
    assert main(argv) == 0
    resumed_calls = list(calls)
    calls.clear()
    assert main(argv) == 0  # everything done: nothing runs
    mp.undo()
    return {"out": out, "argv": argv, "first": first, "first_calls": first_calls, "resumed_calls": resumed_calls,
            "rerun_calls": list(calls)}


def test_a_killed_grid_resumes_without_redoing_finished_cells(finished_grid):
    first, out = finished_grid["first"], finished_grid["out"]
    assert len(first) == 2 and len(finished_grid["first_calls"]) == 3
    resumed = finished_grid["resumed_calls"]
    assert len(resumed) == 6  # 8 cells - 2 finished; the killed one is redone
    assert not {str(p.parent) for p in first} & set(resumed)
    assert finished_grid["first_calls"][2] in resumed
    assert {p: p.stat().st_mtime_ns for p in first} == first  # finished files untouched
    assert finished_grid["rerun_calls"] == []
    assert len(list(out.rglob("result.json"))) == 8
    assert not list(out.rglob("*.tmp"))


def test_results_jsonl_has_one_record_per_cell_with_mnli_splits_kept_apart(finished_grid):
    lines = (finished_grid["out"] / "results.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert len(records) == 8
    cells = {(r["task"], r["settings"]["learning_rate"], r["settings"]["per_device_train_batch_size"]) for r in records}
    assert len(cells) == 8
    for r in records:
        if r["task"] == "mnli":
            assert set(r["dev"]) == {"validation_matched", "validation_mismatched"}
            assert r["selection_split"] == "validation_matched"
            assert r["selection_score"] == r["score_by_split"]["validation_matched"]
        else:
            assert set(r["dev"]["validation"]) == {"pearson", "spearmanr"}


def test_test_predictions_are_in_glue_submission_format(finished_grid):
    cell = finished_grid["out"] / "mnli" / "lr0.0001_bs8_seed7" / "submission"
    for name in ("MNLI-m.tsv", "MNLI-mm.tsv"):
        lines = (cell / name).read_text().splitlines()
        assert lines[0] == "index\tprediction" and len(lines) == 7
        assert [line.split("\t")[0] for line in lines[1:]] == [str(i) for i in range(6)]
        assert {line.split("\t")[1] for line in lines[1:]} <= {"entailment", "neutral", "contradiction"}
    stsb = (finished_grid["out"] / "stsb" / "lr0.001_bs16_seed7" / "submission" / "STS-B.tsv").read_text()
    float(stsb.splitlines()[1].split("\t")[1])


def test_a_finished_cell_is_not_reused_under_other_settings(finished_grid, capsys):
    with pytest.raises(SystemExit) as info:
        main(finished_grid["argv"] + ["--max_seq_length", "32"])
    assert info.value.code == 2
    # the cell keeps the length asked for (the tiny model's 64 positions cut the default 128 where it ran)
    assert "other settings (max_seq_length: 128 there, 32 now)" in capsys.readouterr().err


def test_the_report_has_every_task_the_glue_score_and_a_valid_png(finished_grid, capsys):
    out = finished_grid["out"]
    assert main(["report", str(out), "--teacher_results", str(out)]) == 0
    md = (out / "report.md").read_text()
    for name in GLUE_NAMES:
        assert f"| {name} |" in md
    assert "**GLUE score** (2 of 9 tasks)" in md
    assert "chosen on the dev split it is reported on" in md and "MNLI runs are chosen on matched dev" in md
    assert "teacher best" in md and "DistilBERT (6L)" in md
    mnli_row = next(line for line in md.splitlines() if line.startswith("| MNLI |"))
    assert mnli_row.count("/") >= 3  # m/mm for the student's best, median, and the references
    png = out / "report.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from matplotlib import image
    from PIL import Image

    with Image.open(png) as im:
        im.verify()
    assert image.imread(str(png)).ndim == 3


def test_report_of_an_empty_folder_is_one_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["report", str(tmp_path)])
    assert info.value.code == 2
    assert "no results in" in capsys.readouterr().err


def test_the_grid_script_runs_the_grid_then_the_report(bert_mlm_dir, tmp_path):
    bin_dir = os.path.dirname(sys.executable)
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TASKS": "rte", "GRID": str(tmp_path / "grid.json")}
    if shutil.which("glue-eval", path=env["PATH"]) is None:
        pytest.skip("the glue-eval console script is not installed (pip install -e .)")
    (tmp_path / "grid.json").write_text(json.dumps({"learning_rate": [1e-3], "per_device_train_batch_size": [8],
                                                    "seed": [1, 2], "max_steps": 1}))
    data = write_glue_sample(str(tmp_path / "glue"), "tsv", tasks=["rte"], sizes=(8, 4, 4))
    script = Path(__file__).parents[1] / "scripts" / "glue_grid.sh"
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(script), bert_mlm_dir, str(out), "--data_dir", data, "--use_cpu",
                           "--teacher_results", str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len((out / "results.jsonl").read_text().splitlines()) == 2
    assert "| RTE |" in (out / "report.md").read_text() and (out / "report.png").is_file()


def test_max_seq_length_is_cut_to_the_positions_the_models_hold(bert_mlm_dir, tmp_path):
    from transformers import AutoConfig

    from distill.models.families import max_positions
    from glue_eval.arguments import GlueArguments
    from glue_eval.encode import sequence_length
    from tests import tiny

    limit = max_positions(AutoConfig.from_pretrained(bert_mlm_dir))
    assert sequence_length(GlueArguments(model=bert_mlm_dir, max_seq_length=limit + 36)) == (limit, (
        f"max_seq_length {limit + 36} is longer than --model {bert_mlm_dir} holds ({limit} positions): inputs are cut "
        f"at {limit} tokens"))
    assert sequence_length(GlueArguments(model=bert_mlm_dir, max_seq_length=limit)) == (limit, None)
    # a teacher with a shorter table sets the limit (both read the same tokenized inputs)
    short = tmp_path / "short"
    config = AutoConfig.from_pretrained(bert_mlm_dir)
    config.max_position_embeddings = 40
    config.save_pretrained(short)
    length, note = sequence_length(GlueArguments(model=bert_mlm_dir, teacher=str(short), max_seq_length=128))
    assert length == 40 and "--teacher" in note
    # and so does a tokenizer whose model_max_length is shorter (run_glue's own cap)
    class Tokenizer:
        model_max_length = 32
    assert sequence_length(GlueArguments(model=bert_mlm_dir, max_seq_length=128), Tokenizer())[0] == 32
    Tokenizer.model_max_length = int(1e30)  # transformers' "no limit"
    assert sequence_length(GlueArguments(model=bert_mlm_dir, max_seq_length=128), Tokenizer())[0] == limit
    # a model this machine cannot read (a hub id offline) is left to its loader's own error
    assert sequence_length(GlueArguments(model=str(tmp_path / "absent"), max_seq_length=999)) == (999, None)
    # RoBERTa's table starts padding_idx + 1 rows before position 0: 66 rows hold 64 positions
    roberta = tmp_path / "roberta"
    tiny.build_roberta("roberta_mlm", 400).config.save_pretrained(roberta)
    assert AutoConfig.from_pretrained(roberta).max_position_embeddings == 66
    assert sequence_length(GlueArguments(model=str(roberta), max_seq_length=66))[0] == 64


def test_a_run_past_the_position_table_says_where_it_cuts_and_trains(bert_mlm_dir, tmp_path, capsys):
    """A text longer than the tiny model's 64 positions at --max_seq_length 100: cut at 64 with a note, not an
    index error mid-run."""
    data = write_glue_sample(str(tmp_path / "glue"), "tsv", tasks=["rte"], sizes=(8, 4, 4))
    train = Path(data) / "RTE" / "train.tsv"
    lines = train.read_text().splitlines()
    head, first = lines[0], lines[1].split("\t")
    first[1] = " ".join(["word"] * 150)  # far past 64 tokens
    train.write_text("\n".join([head, "\t".join(first), *lines[2:]]) + "\n")
    out = tmp_path / "out"
    main(["--model", bert_mlm_dir, "--task", "rte", "--data_dir", data, "--output_dir", str(out), "--use_cpu",
          "--num_train_epochs", "1", "--max_seq_length", "100", "--disable_tqdm", "true"])
    err = capsys.readouterr().err
    assert f"note: max_seq_length 100 is longer than --model {bert_mlm_dir} holds (64 positions): inputs are cut " \
           "at 64 tokens" in err
    result = json.loads(next(out.rglob("result.json")).read_text())
    assert result["settings"]["max_seq_length"] == 100  # the setting as asked: a rerun with it resumes


def test_training_arguments_a_grid_may_set_define_the_cell_when_set(tmp_path):
    """A grid file may set any TrainingArguments field: one that changes training (max_grad_norm, the optimiser,
    label smoothing...) joins the cell's settings when it differs from the default, so a rerun with another value
    does not reuse the cell; at the defaults none is written and cells recorded before stay reused."""
    from distill.common.errors import UsageError
    from glue_eval.arguments import GlueArguments, GlueTrainingArguments
    from glue_eval.record import TRAINING_FIELDS, TRAINING_MARKER, describe, done, write_result

    glue = GlueArguments(model="m", task="rte")
    plain = describe(glue, GlueTrainingArguments(output_dir=str(tmp_path)))
    assert not set(TRAINING_FIELDS) & set(plain)
    changed = describe(glue, GlueTrainingArguments(output_dir=str(tmp_path), max_grad_norm=0.5, optim="adamw_torch",
                                                   label_smoothing_factor=0.1))
    assert {k: changed[k] for k in set(changed) - set(plain)} == {
        "max_grad_norm": 0.5, "optim": "adamw_torch", "label_smoothing_factor": 0.1}
    cell = tmp_path / "cell"
    write_result(str(cell), {"task": "rte", "score": 0.5}, plain)
    assert done(str(cell), plain)
    with pytest.raises(UsageError, match=r"other settings \(label_smoothing_factor: None there, 0.1 now\)"):
        done(str(cell), changed)
    json.dumps(changed)  # a result.json can hold them
    # a record written before these fields were recorded (no marker) is reused as it was, set or not
    write_result(str(cell), {"task": "rte", "score": 0.5}, {k: v for k, v in plain.items() if k != TRAINING_MARKER})
    assert done(str(cell), changed) and done(str(cell), plain)


def test_an_mnli_cell_that_selects_its_checkpoint_resumes_as_finished(tmp_path, bert_mlm_dir, capsys):
    """MNLI with --load_best_model_at_end: fine-tuning names the matched split's metric for the selection; the
    recorded settings are what was asked, so the same command finds the cell finished instead of refusing it."""
    data = write_glue_sample(str(tmp_path / "glue"), "tsv", tasks=["mnli"], sizes=(16, 8, 6))
    argv = ["--model", bert_mlm_dir, "--task", "mnli", "--data_dir", data, "--output_dir", str(tmp_path / "out"),
            "--use_cpu", "--disable_tqdm", "true", "--num_train_epochs", "1", "--per_device_train_batch_size", "8",
            "--eval_strategy", "epoch", "--save_strategy", "epoch", "--load_best_model_at_end", "true"]
    assert main(argv) == 0
    (result,) = (tmp_path / "out").rglob("result.json")
    before = result.stat().st_mtime_ns
    assert json.loads(result.read_text())["settings"]["load_best_model_at_end"] is True
    assert main(argv) == 0 and result.stat().st_mtime_ns == before  # finished: not refused, not redone


def test_a_cell_is_not_reused_for_a_run_that_sets_an_optional_setting(tmp_path):
    # describe() writes some settings only when they are set; a run that sets one is not the recorded cell
    from distill.common.errors import UsageError
    from glue_eval.record import RECORDED_WHEN_SET, done, write_result

    cell = tmp_path / "cell"
    settings = {"model": "m", "teacher": "t", "temperature": 2.0, "seed": 1}
    write_result(str(cell), {"task": "x", "score": 0.5}, settings)
    assert done(str(cell), settings)
    assert done(str(cell), {**settings, "a_setting_newer_than_the_record": 3})  # older cells still match
    for key, value in (("layer_map", [[1, 2]]), ("teachers", ["t", "t2"]), ("teacher_gate", "softmax")):
        assert key in RECORDED_WHEN_SET
        with pytest.raises(UsageError, match=rf"other settings \({key}: None there, "):
            done(str(cell), {**settings, key: value})
    write_result(str(cell), {"task": "x", "score": 0.5}, {**settings, "layer_map": [[1, 2]]})
    with pytest.raises(UsageError, match=r"layer_map: \[\[1, 2\]\] there, None now"):
        done(str(cell), settings)


def test_the_median_over_seeds_is_one_runs_metrics_and_agrees_with_every_cells_median():
    """Three MRPC seeds with (F1, accuracy) (90, 80), (85, 86), (88, 70): their task scores are 85, 85.5 and 79;
    the median seed is the first, so the table shows 90/80 and 85 (not the per-metric medians 88/80, score 84,
    a pair no seed had); with an even count the two middle seeds are averaged, as the score's median is."""
    from glue_eval.report import summarise

    def run(seed, f1, acc):
        return {"task": "mrpc", "dev": {"validation": {"f1": f1, "accuracy": acc}}, "score": (f1 + acc) / 2,
                "selection_score": (f1 + acc) / 2,
                "settings": {"learning_rate": 1e-4, "per_device_train_batch_size": 32, "seed": seed}}

    runs = [run(1, 0.90, 0.80), run(2, 0.85, 0.86), run(3, 0.88, 0.70)]
    s = summarise(runs)["mrpc"]
    assert s["median_values"] == pytest.approx([90.0, 80.0]) and s["median_score"] == pytest.approx(85.0)
    assert s["median_score"] == pytest.approx(statistics.median(s["cells"][(1e-4, 32)]))
    s = summarise(runs + [run(4, 0.70, 0.60)])["mrpc"]  # 65, 79, 85, 85.5: the middle two are seeds 3 and 1
    assert s["median_values"] == pytest.approx([(88 + 90) / 2, (70 + 80) / 2])
    assert s["median_score"] == pytest.approx((79 + 85) / 2)
