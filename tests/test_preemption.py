"""Runs that survive what clusters do to them, shown with real processes: SIGTERM/SIGINT/SIGUSR1 end a
run with a checkpoint, one line and exit status 75; SIGKILL at any moment loses at most the steps since
the last checkpoint; either way the resumed run ends with the weights of an uninterrupted one."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from distill.cli import train_main
from distill.objective import losses, terms
from distill.settings.config import make_config
from distill.train import checkpoints as ck
from distill.train.loop import train
from distill.train.signals import EXIT_NO_SPACE, EXIT_STOPPED, RunEnded, StopRequest
from tests import tiny
from tests.test_train import corpus, quiet_teacher, run_config  # noqa: F401  (fixtures)

ROOT = Path(__file__).resolve().parent.parent


def test_a_stop_request_records_the_signal_and_gives_the_handlers_back():
    before = signal.getsignal(signal.SIGUSR1)
    with StopRequest() as stop:
        assert not stop.requested()
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)  # a second signal (e.g. SLURM's SIGTERM after its --signal)
        assert stop.requested() and stop.name == "SIGUSR1"
    assert signal.getsignal(signal.SIGUSR1) is before


def test_before_it_is_armed_a_signal_ends_the_process_at_once_with_the_stop_status(capfd):
    with pytest.raises(RunEnded) as ended, StopRequest(armed=False):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)  # the handler runs at the next bytecode: never reached
    assert ended.value.code == EXIT_STOPPED
    assert "stopped by SIGINT before the first step" in capfd.readouterr().err


def start(values: dict, env=None) -> subprocess.Popen:
    return subprocess.Popen([shutil.which("distill-train")] + tiny.cli_args(values), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def logged_steps(out: Path, since: float = 0.0) -> int:
    """The last step in the run's log, counting only a log written after ``since`` (a time.time())."""
    log = out / "logs" / "train_log.jsonl"
    try:
        if log.stat().st_mtime < since:
            return 0
        lines = log.read_text().splitlines()
    except OSError:
        return 0
    return json.loads(lines[-1])["step"] if lines else 0


def interrupt_at(proc: subprocess.Popen, out: Path, step: int, sig: int, timeout: float = 120) -> str:
    """Send ``sig`` to the run once its log shows ``step`` (mid-way through the next one); its stderr."""
    started = time.time() - 0.01  # the previous piece's log may already show the step: wait for this piece's
    deadline = started + timeout
    while logged_steps(out, started) < step and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    assert proc.poll() is None, f"the run ended before step {step}: {proc.stderr.read()[-2000:]}"
    os.killpg(proc.pid, sig)
    sent = time.time()
    err = proc.communicate(timeout=timeout)[1]
    proc.stopped_after = time.time() - sent
    return err


def base_values(teacher, corpus, tmp_path, name, **overrides):
    # dropout on (the RNG state is part of a checkpoint); checkpoints every 3 steps (SIGKILL loses up to 2)
    values = dict(max_steps=30, save_steps=3, logging_steps=1, save_total_limit=1, num_epochs=1)  # as the CLI
    return run_config(teacher, corpus, tmp_path / name, tmp_path, **{**values, **overrides})


def assert_same_weights(a: Path, b: Path):
    wa, wb = tiny.saved_weights(a), tiny.saved_weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


def test_a_signal_mid_step_finishes_the_step_checkpoints_exits_75_and_resumes_to_identical_weights(
        bert_mlm_dir, corpus, tmp_path, capsys):
    """In-process: a registered term sends SIGTERM to this process during step 5's forward pass."""
    calls = []  # a 0 in it: this run is not signalled

    def signalling(student, teacher, ctx):
        calls.append(1)
        if len(calls) == 5 and 0 not in calls:  # one call per step (one layer pair)
            os.kill(os.getpid(), signal.SIGTERM)
        return losses.hidden_mse(student, teacher, ctx.mask)

    terms.register(terms.TermSpec("signalling_mse", "hidden", signalling, "hid_mse that sends SIGTERM at step 5",
                                  layers="map"))
    try:
        whole = base_values(bert_mlm_dir, corpus, tmp_path, "whole", max_steps=9, weights={"mlm": 1.0,
                            "signalling_mse": 1.0}, layer_map=[[2, 3]])
        before = signal.getsignal(signal.SIGTERM)
        calls.append(0)  # the uninterrupted run
        train(make_config(whole))
        calls.clear()
        values = {**whole, "output_dir": str(tmp_path / "stopped")}
        capsys.readouterr()
        with pytest.raises(SystemExit) as ended:
            train(make_config(values))
        assert ended.value.code == EXIT_STOPPED and signal.getsignal(signal.SIGTERM) is before
        line = capsys.readouterr().err.strip().splitlines()[-1]
        stopped = tmp_path / "stopped" / "checkpoints" / "step-00000005"
        assert line == (f"stopped by SIGTERM after step 5 of 9: checkpoint {stopped}; to resume, run the same command "
                        f"with --resume (exit status {EXIT_STOPPED})")
        assert ck.latest_checkpoint(tmp_path / "stopped") == stopped  # step 5 finished, then saved
        assert not (tmp_path / "stopped" / "model.safetensors").exists()
        record = tmp_path / "stopped" / "checkpoints" / ck.STOP_RECORD
        assert json.loads(record.read_text())["step"] == 5
        calls.append(0)
        train(make_config({**values, "resume": True}))
    finally:
        terms.unregister("signalling_mse")
    assert not record.exists()  # resumed: no longer stopped
    assert_same_weights(tmp_path / "whole", tmp_path / "stopped")


@pytest.mark.slow
def test_ten_mixed_sigterm_and_sigkill_interruptions_resume_to_the_weights_of_an_uninterrupted_run(
        bert_mlm_dir, corpus, tmp_path):
    whole = base_values(bert_mlm_dir, corpus, tmp_path, "whole")
    train(make_config(whole))
    values = {**whole, "output_dir": str(tmp_path / "pieces")}
    out, rng = tmp_path / "pieces", random.Random(27)
    kinds = [signal.SIGTERM, signal.SIGKILL] * 5
    rng.shuffle(kinds)
    for n, sig in enumerate(kinds):
        resume = ck.latest_checkpoint(out, report=False)
        done = int(resume.name[5:]) if resume else 0
        if not resume:  # killed before its first checkpoint: start afresh, as a job script would
            shutil.rmtree(out, ignore_errors=True)
        proc = start({**values, "resume": True} if resume else values)
        err = interrupt_at(proc, out, done + rng.randint(1, 2), sig)
        assert proc.returncode == (EXIT_STOPPED if sig == signal.SIGTERM else -signal.SIGKILL), (n, err[-2000:])
        # SIGTERM to checkpoint-written-and-exited: one (tiny) step plus the save, inside 10 s even on busy cores
        assert sig == signal.SIGKILL or proc.stopped_after < 10, proc.stopped_after
        assert "Traceback" not in err, err
        assert ck.latest_checkpoint(out, report=False) is not None or sig == signal.SIGKILL
    assert logged_steps(out) < 30, "the run finished before its tenth interruption"
    assert train_main(tiny.cli_args({**values, "resume": True})) == 0  # the command line, as the pieces ran
    assert_same_weights(tmp_path / "whole", out)
    # the log holds each step once, as the uninterrupted run's does
    steps = [json.loads(line)["step"] for line in (out / "logs" / "train_log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 31))


def test_a_truncated_newest_checkpoint_falls_back_with_one_line_and_still_resumes_exactly(
        bert_mlm_dir, corpus, tmp_path, capsys):
    whole = base_values(bert_mlm_dir, corpus, tmp_path, "whole", max_steps=12, save_total_limit=3)
    train(make_config(whole))  # leaves checkpoints 3, 6 and 9 beside the student
    out = tmp_path / "whole"
    expected = tiny.saved_weights(out)
    for name in ("model.safetensors", "config.json"):
        (out / name).unlink()
    os.truncate(out / "checkpoints" / "step-00000009" / "state.pt", 1000)
    capsys.readouterr()
    assert train_main(tiny.cli_args({**whole, "resume": True})) == 0
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if "damaged" in line]
    assert warnings == [f"warning: checkpoint {out / 'checkpoints' / 'step-00000009'} is damaged (state.pt has 1000 "
                        f"bytes, its manifest says {(out / 'checkpoints' / 'step-00000006' / 'state.pt').stat().st_size})"
                        ": resuming from step-00000006"], err
    assert "resumed from" in err and "step-00000006 at step 6" in err
    got = tiny.saved_weights(out)
    assert all(torch.equal(expected[k], got[k]) for k in expected)


@pytest.mark.slow
def test_a_run_whose_checkpoint_does_not_fit_ends_in_one_line_with_the_previous_checkpoint_intact(
        bert_mlm_dir, corpus, tmp_path):
    values = base_values(bert_mlm_dir, corpus, tmp_path, "full", max_steps=12)
    # the limit: room for the logs, the config and one checkpoint's temp copy, not for a second file that size
    probe = base_values(bert_mlm_dir, corpus, tmp_path, "probe", max_steps=3, save_steps=2)
    train(make_config(probe))
    size = (ck.latest_checkpoint(tmp_path / "probe") / "state.pt").stat().st_size
    limited = (f"import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
               f"resource.setrlimit(resource.RLIMIT_FSIZE, ({size - 1}, {size - 1})); "
               f"from distill.cli import train_main; sys.exit(train_main(sys.argv[1:]))")
    done = subprocess.run([sys.executable, "-c", limited] + tiny.cli_args(values), capture_output=True, text=True,
                          timeout=300, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == EXIT_NO_SPACE, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(tmp_path / "full" / "checkpoints") in errors[0], done.stderr
    assert "file too large" in errors[0] and "no earlier checkpoint" in errors[0]
    assert ck.list_checkpoints(tmp_path / "full") == []
    assert not list((tmp_path / "full" / "checkpoints").iterdir())  # no temp folder left behind


def torchrun(values: dict) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "--signals_to_handle", "SIGTERM,SIGINT,SIGUSR1", "--shutdown_timeout", "60", "--no-python",
           shutil.which("distill-train")] + tiny.cli_args(values)
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.slow
def test_sigterm_under_torchrun_stops_both_ranks_at_one_step_and_resumes_to_identical_weights(
        bert_mlm_dir, corpus, tmp_path):
    values = base_values(bert_mlm_dir, corpus, tmp_path, "whole", max_steps=10, save_steps=0, per_device_batch_size=2)
    whole = torchrun(values)
    assert whole.wait(timeout=300) == 0, whole.stderr.read()[-3000:]
    values = {**values, "output_dir": str(tmp_path / "stopped")}
    proc = torchrun(values)
    err = interrupt_at(proc, tmp_path / "stopped", 3, signal.SIGTERM)  # torchrun and both ranks, as SLURM does
    lines = [line for line in err.splitlines() if line.startswith("stopped by")]
    assert len(lines) == 1 and "torchrun command with --resume" in lines[0], err[-3000:]  # rank 0 speaks
    assert proc.stopped_after < 50, "torchrun waited for its shutdown timeout (60 s): a rank hung"
    step = int(lines[0].split("after step ")[1].split(" ")[0])
    assert ck.latest_checkpoint(tmp_path / "stopped").name == f"step-{step:08d}"
    # torchrun's own status says nothing of its workers': the record a job script tests
    record = json.loads((tmp_path / "stopped" / "checkpoints" / ck.STOP_RECORD).read_text())
    assert record == {"signal": "SIGTERM", "step": step, "exit_status": EXIT_STOPPED,
                      "checkpoint": str(tmp_path / "stopped" / "checkpoints" / f"step-{step:08d}")}
    resumed = torchrun({**values, "resume": True})
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()[-3000:]
    assert_same_weights(tmp_path / "whole", tmp_path / "stopped")
    assert not (tmp_path / "stopped" / "checkpoints" / ck.STOP_RECORD).exists()


def rank_pid(proc: subprocess.Popen, rank: int, timeout: float = 120) -> int:
    import psutil

    deadline = time.time() + timeout
    while time.time() < deadline:
        for child in psutil.Process(proc.pid).children(recursive=True):
            try:
                if child.environ().get("RANK") == str(rank):
                    return child.pid
            except psutil.Error:
                continue
        time.sleep(0.1)
    raise AssertionError(f"no rank {rank} under torchrun")


@pytest.mark.slow
def test_a_rank_that_dies_ends_the_other_within_seconds_with_one_line_naming_the_loss(bert_mlm_dir, corpus,
                                                                                      tmp_path):
    values = base_values(bert_mlm_dir, corpus, tmp_path, "dead", max_steps=400, save_steps=0,
                         per_device_batch_size=2)
    proc = torchrun(values)
    victim = rank_pid(proc, 1)
    deadline = time.time() + 120
    while logged_steps(tmp_path / "dead") < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.kill(victim, signal.SIGKILL)  # an OOM kill, a lost node
    killed = time.time()
    err = proc.communicate(timeout=120)[1]
    assert time.time() - killed < 30, "the surviving rank hung"  # well inside torchrun's 60 s shutdown timeout
    lost = [line for line in err.splitlines() if "lost contact with another rank" in line]
    assert lost and lost[0].startswith("error: rank 0 of 2") and "--resume" in lost[0], err[-3000:]
    summary = err[err.index("Root Cause"):]
    assert "rank      : 1 (local_rank: 1)" in summary and "SIGKILL" in summary, summary
    assert "/distill/" not in err  # no worker traceback (torchrun prints its own, of its ChildFailedError)


def test_the_process_group_timeout_is_documented_default_or_a_positive_override(monkeypatch):
    from distill.common.errors import UsageError
    from distill.train import distributed

    monkeypatch.delenv(distributed.TIMEOUT_ENV, raising=False)
    assert distributed.process_group_timeout().total_seconds() == 1800
    docs = (ROOT / "docs" / "training.md").read_text()
    assert distributed.TIMEOUT_ENV in docs and "1800" in docs
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "90")
    assert distributed.process_group_timeout().total_seconds() == 90
    for bad in ("0", "-5", "ten"):
        monkeypatch.setenv(distributed.TIMEOUT_ENV, bad)
        with pytest.raises(UsageError, match=f"{distributed.TIMEOUT_ENV}='{bad}' is not a positive number"):
            distributed.process_group_timeout()


def test_only_a_failed_collective_counts_as_a_lost_rank():
    from distill.train.distributed import lost_peer

    assert lost_peer(RuntimeError("[pair.cc:537] Read error [10.0.0.2]:8077: Connection reset by peer. GLHF"))
    assert lost_peer(torch.distributed.DistBackendError("NCCL error"))
    assert not lost_peer(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not lost_peer(ValueError("Connection reset by peer"))
