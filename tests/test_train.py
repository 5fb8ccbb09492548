"""The training loop: it learns, resumes exactly, runs on 2 processes as on 1, and refuses bad input."""

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForMaskedLM, AutoModelForSequenceClassification

from distill.cli import train_main
from distill.common.errors import UsageError
from distill.objective import losses, terms
from distill.settings.config import make_config, parse_config
from distill.train.loop import train
from tests import tiny

DISTILBERT_RECIPE = {"ce": 5.0, "mlm": 2.0, "cos": 1.0, "att_mse": 1.0}


def write_corpus(path: Path, lines: int = 300, seed: int = 0) -> str:
    rng = random.Random(seed)
    text = "\n".join(" ".join(rng.choice(tiny.WORDS) for _ in range(rng.randint(5, 25))) + " ."
                     for _ in range(lines))
    path.write_text(text + "\n")
    return str(path)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus") / "corpus.txt")


@pytest.fixture(scope="module")
def quiet_teacher(tmp_path_factory, vocab_dir):
    """A tiny BertForMaskedLM without dropout, so runs on 1 and 2 processes can be compared exactly."""
    return tiny.save_model("bert_mlm", tmp_path_factory.mktemp("quiet"), vocab_dir, hidden_dropout_prob=0.0,
                           attention_probs_dropout_prob=0.0)


def run_config(teacher, corpus, out, tmp_path, **overrides):
    values = dict(teacher=teacher, corpus=corpus, output_dir=str(out), cache_dir=str(tmp_path / "cache"),
                  student_layers=[1, 3], student_type="bert", weights=DISTILBERT_RECIPE, block_size=32,
                  per_device_batch_size=4, gradient_accumulation_steps=1, learning_rate=1e-3, max_steps=6,
                  precision="fp32", save_steps=0, logging_steps=1, progress=False, device="cpu")
    values.update(overrides)
    return values


cli_args, weights = tiny.cli_args, tiny.saved_weights


def read_log(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "logs" / "train_log.jsonl").read_text().splitlines()]


def test_a_short_run_lowers_the_objective_and_saves_a_loadable_student(bert_mlm_dir, corpus, tmp_path):
    out = tmp_path / "run"
    train(make_config(run_config(bert_mlm_dir, corpus, out, tmp_path, max_steps=30, logging_steps=5,
                                 student_type="distilbert")))
    log = read_log(out)
    for term in DISTILBERT_RECIPE:
        assert term in log[-1] and all(term in r for r in log)
    # ce carries the teacher's (constant) tempered entropy, so judge learning by the distances;
    # att_mse starts near 0 (the student's layers are copies) and may rise while the others fall
    assert log[-1]["cos"] < 0.8 * log[0]["cos"] and log[-1]["mlm"] < log[0]["mlm"]
    assert log[-1]["loss"] < log[0]["loss"]
    assert {"lr", "loss_scale", "skipped_steps", "tokens_per_s", "grad_norm"} <= set(log[-1])
    assert any((out / "logs" / "tensorboard").iterdir())
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "distilbert" and config["n_layers"] == 2
    assert not config.get("output_hidden_states") and not config.get("output_attentions")
    assert AutoModelForMaskedLM.from_pretrained(out).config.n_layers == 2
    AutoModelForSequenceClassification.from_pretrained(out)
    card = (out / "README.md").read_text()
    for needle in (bert_mlm_dir, "1,3", "5*ce", "2*mlm", "1*cos", "fp32", "30 optimiser steps"):
        assert needle in card, needle
    recipe = json.loads((out / "distill_config.json").read_text())
    assert recipe["weights"] == DISTILBERT_RECIPE and recipe["max_steps"] == 30
    assert not list(out.glob(".*tmp*"))


@pytest.mark.slow
def test_two_processes_equal_one_with_the_same_global_batch(quiet_teacher, corpus, tmp_path):
    base = run_config(quiet_teacher, corpus, tmp_path / "one", tmp_path, max_steps=4, per_device_batch_size=3)
    train(make_config({**base, "gradient_accumulation_steps": 2}))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = {**base, "output_dir": str(tmp_path / "two")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--no-python",
           shutil.which("distill-train")] + cli_args(two)
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = weights(tmp_path / "one"), weights(tmp_path / "two")
    start = weights(quiet_teacher)
    moved = 0
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-5, atol=1e-6)
        moved += int(not torch.equal(one[key], start.get(key, torch.zeros(0))))
    assert moved > 10  # the runs trained: most tensors left their initial values
    assert read_log(tmp_path / "one")[-1]["loss"] == pytest.approx(read_log(tmp_path / "two")[-1]["loss"], rel=1e-5)


@pytest.mark.slow
def test_resume_after_sigkill_matches_an_uninterrupted_run(bert_mlm_dir, corpus, tmp_path):
    # dropout stays on: the RNG state is part of the checkpoint
    base = run_config(bert_mlm_dir, corpus, tmp_path / "whole", tmp_path, max_steps=80, save_steps=10,
                      logging_steps=10, per_device_batch_size=4)
    train(make_config(base))
    killed = {**base, "output_dir": str(tmp_path / "killed")}
    tiny.kill_after_checkpoint(killed, 20)
    assert train_main(cli_args({**killed, "resume": True})) == 0
    whole, resumed = weights(tmp_path / "whole"), weights(tmp_path / "killed")
    assert whole.keys() == resumed.keys()
    for key in whole:
        assert torch.equal(whole[key], resumed[key]), key
    # the steps redone after the checkpoint are logged once, as in the uninterrupted run
    assert [r["step"] for r in read_log(tmp_path / "killed")] == [r["step"] for r in read_log(tmp_path / "whole")]


def test_non_finite_loss_stops_with_a_clear_message_after_saving(bert_mlm_dir, corpus, tmp_path, capsys):
    # A registered term that turns NaN at its 7th call (step 7): every input is in range, the loss is not.
    calls = []

    def poisoned(student, teacher, ctx):
        calls.append(1)
        value = losses.hidden_mse(student, teacher, ctx.mask)
        return value * float("nan") if len(calls) > 6 else value

    terms.register(terms.TermSpec("poisoned_mse", "hidden", poisoned, "hid_mse that turns NaN at step 7",
                                  layers="map"))
    try:
        out = tmp_path / "nan"
        values = run_config(bert_mlm_dir, corpus, out, tmp_path, max_steps=30,
                            weights={"mlm": 1.0, "poisoned_mse": 1.0}, warmup_ratio=0.0,
                            layer_map=[[2, 3]])  # one layer pair: one call per step
        assert train_main(cli_args(values)) == 1
    finally:
        terms.unregister("poisoned_mse")
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: loss is") and "start a new run" in err and "same batch" in err
    saved = sorted((out / "checkpoints").glob("step-*"))
    assert [p.name for p in saved] == ["step-00000006"], "the last good state (step 6) was not saved"
    state = torch.load(saved[-1] / "state.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_a_layer_map_pairing_fresh_copies_with_their_sources_gets_a_note(bert_mlm_dir, corpus, tmp_path, capsys):
    weights = {"hid_mse": 1.0, "att_mse": 1.0}
    train(make_config(run_config(bert_mlm_dir, corpus, tmp_path / "a", tmp_path, weights=weights, max_steps=1)))
    err = capsys.readouterr().err
    # layers 1,3 of 4: student layer 1 is teacher layer 1 on the same input; layer 2 (teacher 3) is not
    assert "note: hid_mse, att_mse compare student layers 1 with the teacher layers they were copied from" in err
    assert "start near 0" in err
    assert "a layer_map such as [[1, 2], [2, 4]] gives them targets" in err
    train(make_config(run_config(bert_mlm_dir, corpus, tmp_path / "b", tmp_path, weights=weights, max_steps=1,
                                 layer_map=[[1, 2], [2, 4]])))
    train(make_config(run_config(bert_mlm_dir, corpus, tmp_path / "c", tmp_path, weights=weights, max_steps=1,
                                 student_layers=[2, 4])))
    assert "note:" not in capsys.readouterr().err


def test_without_arguments_the_config_is_the_offline_demo_recipe():
    demo = Path(__file__).parent.parent / "student_configs" / "demo_minilm_3l.json"
    assert parse_config([]) == parse_config(["--config", str(demo)])
    assert parse_config([]).student_layers == [2, 4, 6]


@pytest.mark.slow
def test_demo_pipeline_runs_on_the_real_teacher_and_corpus(tmp_path):
    out = tmp_path / "demo"
    assert train_main(["--config", str(Path(__file__).parent.parent / "student_configs" / "demo_minilm_3l.json"),
                       "--output_dir", str(out), "--max_steps", "2", "--max_documents", "6", "--per_device_batch_size",
                       "4", "--cache_dir", str(tmp_path / "cache"), "--progress", "false"]) == 0
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(out)
    assert model.config.num_hidden_layers == 3
    batch = AutoTokenizer.from_pretrained(out)(["Wikipedia is an encyclopedia."], return_tensors="pt")
    assert model(**batch).last_hidden_state.shape[-1] == 384


# --- bad input: one line, exit 2, nothing written ---------------------------------------------

def _bad(capsys, values, tmp_path):
    with pytest.raises(SystemExit) as exc:
        train_main(cli_args(values))
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2, err
    assert len(err.splitlines()) == 1, err
    assert not Path(values["output_dir"]).exists()
    return err


def test_missing_corpus(capsys, bert_mlm_dir, tmp_path):
    err = _bad(capsys, run_config(bert_mlm_dir, str(tmp_path / "nope.txt"), tmp_path / "o", tmp_path), tmp_path)
    assert "nope.txt" in err


def test_corpus_without_text(capsys, bert_mlm_dir, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n")
    err = _bad(capsys, run_config(bert_mlm_dir, str(empty), tmp_path / "o", tmp_path), tmp_path)
    assert "empty.txt" in err and "text" in err


def test_block_size_beyond_position_limit(capsys, bert_mlm_dir, corpus, tmp_path):
    err = _bad(capsys, run_config(bert_mlm_dir, corpus, tmp_path / "o", tmp_path, block_size=100), tmp_path)
    assert "100" in err and "64" in err


def test_layer_map_that_does_not_fit(capsys, bert_mlm_dir, corpus, tmp_path):
    # the student has one layer per entry of student_layers; the map's second entry names one past it
    values = run_config(bert_mlm_dir, corpus, tmp_path / "o", tmp_path, weights={"hid_mse": 1.0})
    n_student = len(values["student_layers"])
    bad = [[1, 1], [n_student + 1, 4]]
    err = _bad(capsys, {**values, "layer_map": bad}, tmp_path)
    assert err == (f"error: layer map entry {n_student + 1}->4: student layer {n_student + 1} does not exist "
                   f"(the student has {n_student} layers; layers are 1-based, 0 is the embeddings)")
    # the same map inside the student trains: the refusal was the layer count, nothing else
    train(make_config({**values, "layer_map": [[1, 1], [n_student, 4]], "max_steps": 1}))
    assert json.loads((tmp_path / "o" / "distill_config.json").read_text())["layer_map"] == [[1, 1], [n_student, 4]]


def test_student_tokenizer_differs_from_teacher(capsys, bert_mlm_dir, corpus, tmp_path):
    from distill.models.student import init_student

    student = tmp_path / "student"
    init_student(bert_mlm_dir, "1,3", str(student))
    vocab = (student / "vocab.txt")
    lines = tiny.vocab_tokens()
    lines[1], lines[2] = lines[2], lines[1]  # [CLS] gets another id
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (student / name).unlink(missing_ok=True)
    vocab.write_text("\n".join(lines) + "\n")
    err = _bad(capsys, run_config(bert_mlm_dir, corpus, tmp_path / "o", tmp_path, student=str(student)), tmp_path)
    assert "tokenizer" in err


def test_ce_with_a_teacher_without_mlm_head(capsys, bert_base_dir, bert_mlm_dir, corpus, tmp_path):
    # a teacher without a masked-LM head gives a student without one (layer selection copies the classes)
    err = _bad(capsys, run_config(bert_base_dir, corpus, tmp_path / "o", tmp_path, weights={"ce": 1.0}), tmp_path)
    assert err.startswith("error: term 'ce' needs a masked-LM head on the student, but the student (BertModel) has "
                          "none: distil its representations instead")
    # the same recipe from the masked-LM teacher runs: the refusal was the missing head
    train(make_config(run_config(bert_mlm_dir, corpus, tmp_path / "mlm", tmp_path, weights={"ce": 1.0}, max_steps=1)))
    assert (tmp_path / "mlm" / "config.json").exists()


def test_a_fresh_run_over_an_old_folder_logs_only_its_own_steps(bert_mlm_dir, corpus, tmp_path):
    values = run_config(bert_mlm_dir, corpus, tmp_path / "o", tmp_path, max_steps=3, weights={"cos": 1.0})
    train(make_config(values))
    train(make_config({**values, "max_steps": 2, "overwrite_output_dir": True}))
    assert [r["step"] for r in read_log(tmp_path / "o")] == [1, 2]  # not 1, 2, 3, 1, 2


def test_existing_output_needs_overwrite_or_resume(capsys, bert_mlm_dir, corpus, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "x").write_text("keep")
    with pytest.raises(SystemExit):
        train_main(cli_args(run_config(bert_mlm_dir, corpus, out, tmp_path)))
    assert "--overwrite_output_dir" in capsys.readouterr().err and (out / "x").read_text() == "keep"


def test_resume_refuses_a_changed_recipe(capsys, bert_mlm_dir, corpus, tmp_path):
    values = run_config(bert_mlm_dir, corpus, tmp_path / "o", tmp_path, max_steps=4, save_steps=2)
    train(make_config(values))
    with pytest.raises(SystemExit):
        train_main(cli_args({**values, "resume": True, "gradient_accumulation_steps": 2}))
    err = capsys.readouterr().err.strip()
    assert "gradient_accumulation_steps=2" in err and "started with 1" in err


def test_an_overwritten_folder_loses_the_old_runs_checkpoints_and_a_checkpoint_of_another_recipe_is_refused(
        capsys, bert_mlm_dir, corpus, tmp_path):
    """--overwrite_output_dir starts afresh: a later --resume must not continue the previous run's checkpoints
    (once, it would have loaded them under the new recipe's distill_config.json); a checkpoint put there by
    hand is checked against its own recipe."""
    old = run_config(bert_mlm_dir, corpus, tmp_path / "o", tmp_path, max_steps=4, save_steps=2, seed=1)
    train(make_config(old))
    kept = tmp_path / "old-checkpoint"
    shutil.copytree(tmp_path / "o" / "checkpoints" / "step-00000002", kept)
    capsys.readouterr()
    new = {**old, "seed": 2, "save_steps": 0, "overwrite_output_dir": True}
    train(make_config(new))
    assert "removed the previous run's checkpoints" in capsys.readouterr().err
    assert not (tmp_path / "o" / "checkpoints").exists() or not any((tmp_path / "o" / "checkpoints").iterdir())
    resumed = make_config({**new, "overwrite_output_dir": False, "resume": True})
    with pytest.raises(UsageError, match="no checkpoint"):
        train(resumed)
    shutil.copytree(kept, tmp_path / "o" / "checkpoints" / "step-00000002")
    with pytest.raises(UsageError) as err:
        train(resumed)
    assert "step-00000002" in str(err.value) and "seed=1" in str(err.value) and "this run has 2" in str(err.value)


@pytest.mark.parametrize("field,value,needle", [
    ("logging_steps", 0, "logging_steps=0"),
    ("warmup_ratio", 7, "warmup_ratio=7"),
    ("student_layers", [1.9, 3.2], "whole layer numbers"),
    ("save_steps", -5, "save_steps=-5"),
])
def test_out_of_range_values_are_refused_before_any_work(capsys, bert_mlm_dir, corpus, tmp_path, field, value, needle):
    err = _bad(capsys, run_config(bert_mlm_dir, corpus, tmp_path / "o", tmp_path, **{field: value}), tmp_path)
    assert needle in err


def test_student_layers_must_agree_with_the_student_folder(capsys, bert_mlm_dir, corpus, tmp_path):
    from distill.models.student import init_student

    init_student(bert_mlm_dir, "1,3", str(tmp_path / "student"))
    err = _bad(capsys, run_config(bert_mlm_dir, corpus, tmp_path / "o", tmp_path, student=str(tmp_path / "student"),
                                  student_layers=[2, 4]), tmp_path)
    assert "[2, 4]" in err and "[1, 3]" in err


@pytest.mark.slow
def test_recipe_script_runs_through_torchrun_and_keeps_the_global_batch(quiet_teacher, corpus, tmp_path):
    """scripts/distill_bert_4l.sh with the hub teacher swapped for a tiny one: the real script path."""
    script = Path(__file__).parent.parent / "scripts" / "distill_bert_4l.sh"
    out = tmp_path / "script-run"
    overrides = cli_args({"teacher": quiet_teacher, "corpus": corpus, "cache_dir": str(tmp_path / "cache"),
                          "student_layers": [1, 3], "block_size": 32, "per_device_batch_size": 2, "max_steps": 2,
                          "precision": "fp32", "num_proc": 1, "save_steps": 0, "progress": False, "device": "cpu"})
    done = subprocess.run(["bash", str(script), "1", str(out)] + overrides, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    recipe = json.loads((out / "distill_config.json").read_text())
    assert recipe["weights"] == {"ce": 5.0, "mlm": 2.0, "cos": 1.0} and recipe["student_type"] == "distilbert"
    assert recipe["gradient_accumulation_steps"] == 8  # one GPU: the recipe's own accumulation
    assert json.loads((out / "config.json").read_text())["n_layers"] == 2


@pytest.mark.parametrize("gpus, accumulation", [("1", "8"), ("2", "4"), ("8", "1"), ("3", None), ("16", None),
                                                ("0", None), ("two", None)])
def test_run_recipe_divides_the_accumulation_by_the_gpu_count_or_refuses_a_count_that_would_change_the_batch(
        tmp_path, gpus, accumulation):
    """scripts/run_recipe.sh hands torchrun the recipe with gradient_accumulation_steps / NUM_GPUS (the recipe's
    8 here); a count that does not divide it is refused in one line, torchrun never started (a stand-in
    torchrun on PATH records what it is given)."""
    script = Path(__file__).parent.parent / "scripts" / "run_recipe.sh"
    fake = tmp_path / "bin" / "torchrun"
    fake.parent.mkdir()
    fake.write_text(f'#!/usr/bin/env bash\necho "$@" > {tmp_path / "argv"}\n')
    fake.chmod(0o755)
    assert json.loads((script.parent.parent / "student_configs" / "bert_4l_1-5-8-12.json").read_text())[
        "gradient_accumulation_steps"] == 8
    done = subprocess.run(["bash", str(script), "bert_4l_1-5-8-12.json", gpus, str(tmp_path / "out"), "--seed", "3"],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PATH": f"{fake.parent}{os.pathsep}{os.environ['PATH']}"})
    if accumulation is None:
        assert done.returncode != 0 and not (tmp_path / "argv").exists()
        (line,) = done.stderr.strip().splitlines()
        assert f"NUM_GPUS {gpus!r} does not divide" in line and "divides 8" in line
        return
    assert done.returncode == 0, done.stderr
    argv = (tmp_path / "argv").read_text().split()
    assert argv[argv.index("--nproc_per_node") + 1] == gpus
    assert argv[argv.index("--gradient_accumulation_steps") + 1] == accumulation and argv[-2:] == ["--seed", "3"]


def test_the_seed_fixes_the_width_projections_too(quiet_teacher, corpus, tmp_path):
    """A narrower student learns through hid_mse's student->teacher projection, created with the objective: the
    same --seed gives the same weights whatever the process drew before (the projection was once built before
    the seed was set), with glibc's allocator tuned or not."""
    saved = []
    for i, noise in enumerate((123, 456)):
        torch.manual_seed(noise)
        random.seed(noise)
        out = tmp_path / f"run{i}"
        train(make_config(run_config(quiet_teacher, corpus, out, tmp_path, student_layers=None, student_num_layers=2,
                                     student_hidden_size=16, student_num_heads=2, weights={"hid_mse": 1.0},
                                     layer_map=[[1, 2], [2, 4]], max_steps=3, malloc_tuning=i == 0)))
        saved.append(weights(out))
        resolved = json.loads((out / "distill_config.json").read_text())["_resolved"]
        if sys.platform.startswith("linux"):  # the allocator's tuning is recorded; it changes no weight (below)
            assert resolved["allocator"].startswith("glibc malloc tuned" if i == 0 else "the allocator's defaults")
    assert saved[0].keys() == saved[1].keys()
    for name in saved[0]:
        assert torch.equal(saved[0][name], saved[1][name]), name


def test_teacher_fp32_is_said_and_recorded(quiet_teacher, corpus, tmp_path, capsys):
    out = tmp_path / "t32"
    train(make_config(run_config(quiet_teacher, corpus, out, tmp_path, max_steps=1, precision="bf16",
                                 teacher_fp32=True, weights={"hid_mse": 1.0})))
    (banner,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("distilling ")]
    assert "bf16 (" in banner and "; the teacher in fp32 (teacher_fp32);" in banner
    assert json.loads((out / "distill_config.json").read_text())["teacher_fp32"] is True
    from distill.train.distributed import setup_distributed
    from distill.train.setup import build_run

    for fp32 in (False, True):  # the teacher's linear weights: cast once to bf16, or left in fp32
        cfg = make_config(run_config(quiet_teacher, corpus, tmp_path / f"b{fp32}", tmp_path, precision="bf16",
                                     teacher_fp32=fp32, weights={"hid_mse": 1.0}))
        run = build_run(cfg, setup_distributed(cfg.device))
        linear = next(m for m in run.teacher.modules() if isinstance(m, torch.nn.Linear))
        assert linear.weight.dtype == (torch.float32 if fp32 else torch.bfloat16)
