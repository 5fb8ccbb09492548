"""Bad input to glue-eval: one clear stderr line, exit code 2, nothing written."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from glue_eval.cli import main
from glue_eval.samples import write_glue_sample
from tests import tiny


@pytest.fixture()
def glue_dir(tmp_path):
    return Path(write_glue_sample(str(tmp_path / "glue"), "tsv", tasks=["rte", "mnli"], sizes=(6, 4, 4)))


def _run(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    captured = capsys.readouterr()
    assert exit_info.value.code == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    return lines[0]


def _args(model, data, out, task="rte"):
    return ["--model", str(model), "--task", task, "--data_dir", str(data), "--output_dir", str(out),
            "--use_cpu", "--num_train_epochs", "1"]


def _nothing_written(out):
    return not any(p.is_file() for p in Path(out).rglob("*")) if Path(out).exists() else True


def test_unknown_task(bert_mlm_dir, glue_dir, tmp_path, capsys):
    line = _run(_args(bert_mlm_dir, glue_dir, tmp_path / "out", task="SST-3"), capsys)
    assert "unknown task 'SST-3'" in line and "SST-2" in line
    assert _nothing_written(tmp_path / "out")


def test_missing_split_file(bert_mlm_dir, glue_dir, tmp_path, capsys):
    os.remove(glue_dir / "MNLI" / "dev_mismatched.tsv")
    line = _run(_args(bert_mlm_dir, glue_dir, tmp_path / "out", task="rte,mnli"), capsys)
    assert "validation_mismatched" in line and "dev_mismatched.tsv" in line
    assert _nothing_written(tmp_path / "out")  # RTE, which was fine, did not start either


def test_tsv_row_with_the_wrong_column_count(bert_mlm_dir, glue_dir, tmp_path, capsys):
    with open(glue_dir / "RTE" / "train.tsv", "a", encoding="utf-8") as f:
        f.write("99\tonly two columns\n")
    line = _run(_args(bert_mlm_dir, glue_dir, tmp_path / "out"), capsys)
    assert "train.tsv line 8: 2 columns where there should be 4" in line and "--skip_bad_rows" in line
    assert _nothing_written(tmp_path / "out")


def test_label_not_in_the_tasks_label_list(bert_mlm_dir, glue_dir, tmp_path, capsys):
    with open(glue_dir / "MNLI" / "dev_matched.tsv", "a", encoding="utf-8") as f:
        f.write("\t".join(["9"] * 15 + ["entails"]) + "\n")
    line = _run(_args(bert_mlm_dir, glue_dir, tmp_path / "out", task="mnli"), capsys)
    assert "label 'entails' is not one of MNLI's labels" in line and "contradiction" in line
    assert _nothing_written(tmp_path / "out")


def test_model_folder_without_a_tokenizer(glue_dir, tmp_path, capsys):
    bare = tiny.save_model("bert_mlm", tmp_path / "bare")  # config + weights, no tokenizer files
    line = _run(_args(bare, glue_dir, tmp_path / "out"), capsys)
    assert "has no tokenizer" in line and "--tokenizer" in line
    assert _nothing_written(tmp_path / "out")


def test_missing_output_dir_and_fp16_on_cpu(bert_mlm_dir, glue_dir, tmp_path, capsys):
    line = _run(["--model", bert_mlm_dir, "--task", "rte", "--data_dir", str(glue_dir)], capsys)
    assert "--output_dir is required" in line
    if not __import__("torch").cuda.is_available():
        line = _run(_args(bert_mlm_dir, glue_dir, tmp_path / "out") + ["--fp16"], capsys)
        assert "--fp16 needs a CUDA GPU" in line


@pytest.mark.slow
def test_the_console_script_prints_one_line_and_exits_2(bert_mlm_dir, glue_dir, tmp_path):
    with open(glue_dir / "RTE" / "dev.tsv", "a", encoding="utf-8") as f:
        f.write("5\ta\tb\tmaybe\n")
    cmd = [sys.executable, "-c", "from glue_eval.cli import main; main()",
           *_args(bert_mlm_dir, glue_dir, tmp_path / "out")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=Path(__file__).parents[1], timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert "label 'maybe' is not one of RTE's labels ['entailment', 'not_entailment']" in proc.stderr
    assert _nothing_written(tmp_path / "out")


@pytest.mark.parametrize("grid, named", [
    ({"learning_rate": ["fast"]}, "learning_rate value 'fast'"),
    ({"learning_rate": [0]}, "learning_rate value 0 "),
    ({"per_device_train_batch_size": [16, 0]}, "per_device_train_batch_size value 0 "),
    ({"per_device_train_batch_size": [2.5]}, "per_device_train_batch_size value 2.5 "),
    ({"seed": [True]}, "seed value True "),
    ({"max_seq_length": "long"}, "max_seq_length 'long' "),
])
def test_bad_grid_values_are_one_line_before_anything_runs(bert_mlm_dir, glue_dir, tmp_path, capsys, grid, named):
    import json

    spec = tmp_path / "grid.json"
    spec.write_text(json.dumps(grid))
    out = tmp_path / "out"
    argv = ["--model", str(bert_mlm_dir), "--task", "rte", "--grid", str(spec), "--data_dir", str(glue_dir),
            "--output_dir", str(out), "--use_cpu"]
    line = _run(argv, capsys)
    assert named in line and "e.g." in line
    assert _nothing_written(out)


@pytest.mark.parametrize("length", ["0", "4"])
def test_a_max_seq_length_too_short_for_a_sentence_pair_is_one_line(bert_mlm_dir, glue_dir, tmp_path, capsys, length):
    out = tmp_path / "out"
    line = _run(_args(bert_mlm_dir, glue_dir, out) + ["--max_seq_length", length], capsys)
    assert f"--max_seq_length {length} must be a whole number >= 8" in line and "e.g. 128" in line
    assert _nothing_written(out)
