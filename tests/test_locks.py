"""One writer per output folder: a live run's folder refuses every other writer, with real processes."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from transformers import AutoModelForMaskedLM

from distill.cli import init_main, train_main
from distill.common.locks import LOCK_NAME, output_lock
from tests import tiny
from tests.test_train import run_config, write_corpus

ROOT = str(Path(__file__).resolve().parents[1])
ENV = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1",
       "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}

# A real distill-train process that stops right before it saves the student (the moment a clobbering
# second run would do most harm) until the test creates the "go" file.
PAUSED_TRAIN = """
import sys, time
from pathlib import Path
import distill.train.loop as t
paused, go = Path(sys.argv[1]), Path(sys.argv[2])
real = t.save_student
def save_when_told(*args, **kwargs):
    paused.write_text("paused")
    while not go.exists():
        time.sleep(0.05)
    return real(*args, **kwargs)
t.save_student = save_when_told
from distill.cli import train_main
raise SystemExit(train_main(sys.argv[3:]))
"""


TRAIN = [sys.executable, "-c", "from distill.cli import train_main; raise SystemExit(train_main())"]
GLUE = [sys.executable, "-c", "from glue_eval.cli import main; raise SystemExit(main())"]


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240.0) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the first run ended early: {proc.stderr.read()[-3000:]}")
        if time.time() > deadline:
            proc.kill()
            raise AssertionError("the first run did not reach the pause in time")
        time.sleep(0.05)


def refused(cmd: list[str]) -> str:
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=240)
    err = done.stderr.strip()
    assert done.returncode == 2, (done.returncode, err[-3000:])
    assert len(err.splitlines()) == 1, err
    return err


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus") / "corpus.txt")


@pytest.mark.slow
def test_a_second_writer_is_refused_while_a_run_writes_and_the_run_finishes_unharmed(bert_mlm_dir, corpus, tmp_path):
    out = tmp_path / "run"
    values = run_config(bert_mlm_dir, corpus, out, tmp_path, max_steps=4, save_steps=2, save_total_limit=2)
    paused, go = tmp_path / "paused", tmp_path / "go"
    first = subprocess.Popen([sys.executable, "-c", PAUSED_TRAIN, str(paused), str(go)] + tiny.cli_args(values),
                             env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(paused, first)
        holder = json.loads((out / LOCK_NAME).read_text())
        assert holder["pid"] == first.pid and holder["host"] == socket.gethostname()
        before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file() and "tensorboard" not in p.parts}

        second = tiny.cli_args({**values, "learning_rate": 0.5, "overwrite_output_dir": True})
        err = refused(TRAIN + second)
        assert f"pid {first.pid}" in err and "distill-train" in err and str(out) in err
        err = refused(TRAIN + tiny.cli_args({**values, "resume": True}))
        assert f"pid {first.pid}" in err
        err = refused(GLUE + ["--model", bert_mlm_dir, "--task", "rte", "--output_dir", str(out), "--use_cpu"])
        assert f"pid {first.pid}" in err
        after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file() and "tensorboard" not in p.parts}
        assert after == before  # the refused writers touched nothing
    finally:
        go.write_text("go")
        _, err = first.communicate(timeout=240)
    assert first.returncode == 0, err[-3000:]
    assert not (out / LOCK_NAME).exists()
    assert json.loads((out / "distill_config.json").read_text())["learning_rate"] == values["learning_rate"]
    assert [json.loads(line)["step"] for line in (out / "logs" / "train_log.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    AutoModelForMaskedLM.from_pretrained(str(out))  # whole and loadable


HOLD = """
import sys, time
from pathlib import Path
from distill.common.locks import output_lock
from distill.common.errors import UsageError
folder, report, others = sys.argv[1], Path(sys.argv[2]), [Path(p) for p in sys.argv[3:]]
try:
    with output_lock(folder, "holder"):
        report.write_text("won")
        deadline = time.time() + 120
        while not all(p.exists() for p in others) and time.time() < deadline:
            time.sleep(0.05)  # hold the lock until every other process has tried
except UsageError as err:
    report.write_text("refused: " + str(err))
"""


@pytest.mark.slow
def test_of_processes_racing_for_one_folder_exactly_one_wins(tmp_path):
    folder = tmp_path / "out"
    reports = [tmp_path / f"r{i}" for i in range(4)]
    procs = [subprocess.Popen([sys.executable, "-c", HOLD, str(folder), str(r), *[str(o) for o in reports if o != r]],
                              env=ENV) for r in reports]
    for p in procs:
        assert p.wait(timeout=120) == 0
    outcomes = [r.read_text() for r in reports]
    assert outcomes.count("won") == 1, outcomes
    assert all(o.startswith("refused: ") and "in use by holder" in o for o in outcomes if o != "won")
    # nothing is left behind: no lock, no private copy. The folder itself may remain, empty: when a racer that
    # loses created it, the winner's lock was inside when that racer tried to remove it, and the winner does not
    # remove a folder it did not create (it may be the user's)
    assert not folder.exists() or not any(folder.iterdir())


def gone_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_stale_lock_is_taken_over_with_a_note(bert_mlm_dir, corpus, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    dead = gone_pid()
    (out / LOCK_NAME).write_text(json.dumps({"pid": dead, "host": socket.gethostname(), "command": "distill-train",
                                             "started": "earlier"}))
    assert train_main(tiny.cli_args(run_config(bert_mlm_dir, corpus, out, tmp_path, max_steps=2))) == 0
    err = capsys.readouterr().err
    assert "stale lock" in err and f"pid {dead}" in err
    assert not (out / LOCK_NAME).exists() and (out / "model.safetensors").exists()


def test_a_lock_from_another_host_is_refused_with_how_to_clear_it(bert_mlm_dir, corpus, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    lock = out / LOCK_NAME
    lock.write_text(json.dumps({"pid": 1, "host": "some-other-host", "command": "glue-eval", "started": "earlier"}))
    with pytest.raises(SystemExit) as exc:
        train_main(tiny.cli_args(run_config(bert_mlm_dir, corpus, out, tmp_path, overwrite_output_dir=True)))
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and len(err.splitlines()) == 1
    assert "some-other-host" in err and "glue-eval" in err and str(lock) in err
    assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]  # nothing written, the lock left alone


def test_distill_init_does_not_replace_a_folder_that_a_live_process_holds(bert_mlm_dir, tmp_path, capsys):
    out = tmp_path / "student"
    with output_lock(out, "distill-train"):
        (out / "x").write_text("keep")
        lock = json.loads((out / LOCK_NAME).read_text())
        lock["pid"] = os.getppid()  # pose as another live process on this host
        (out / LOCK_NAME).write_text(json.dumps(lock))
        with pytest.raises(SystemExit) as exc:
            init_main(["--teacher", bert_mlm_dir, "--layers", "1,3", "--output", str(out), "--overwrite"])
        assert exc.value.code == 2 and "in use by distill-train" in capsys.readouterr().err
        assert (out / "x").read_text() == "keep"


def test_a_process_that_holds_a_folder_may_enter_it_again(tmp_path):
    out = tmp_path / "grid"
    with output_lock(out, "bench"):
        with output_lock(out, "glue-eval") as inner:  # e.g. a study running a grid in its own folder
            assert inner.nested
        assert json.loads((out / LOCK_NAME).read_text())["command"] == "bench"  # still held by the outer one
    assert not out.exists()


@pytest.mark.parametrize("links", [True, False])
def test_the_lock_appears_with_its_record_and_leaves_no_private_copy(tmp_path, monkeypatch, links):
    """Linked into place from a private copy that holds the record (a racer never reads it empty); without hard
    links, the exclusive create then the write. Either way only the lock is left in the folder, and it is the
    holder's."""
    import os

    from distill.common.locks import output_lock, read_lock

    if not links:
        def no_links(*_):
            raise OSError(1, "Operation not permitted")
        monkeypatch.setattr(os, "link", no_links)
    folder = tmp_path / "out"
    with output_lock(folder, "holder"):
        assert sorted(p.name for p in folder.iterdir()) == [LOCK_NAME]
        record = read_lock(folder / LOCK_NAME, tries=1)
        assert record["pid"] == os.getpid() and record["command"] == "holder"
        with pytest.raises(FileExistsError):  # a second create fails, whichever way it goes
            output_lock(folder, "other")._create(folder / LOCK_NAME)
        assert sorted(p.name for p in folder.iterdir()) == [LOCK_NAME]
    assert not folder.exists()
