"""Checkpoints that can be trusted: synced, described by a manifest, verified before a resume, loaded
without running code, never all pruned away, and a full disk that ends the run in one line."""

import hashlib
import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import get_linear_schedule_with_warmup

from distill.settings.config import make_config
from distill.train import checkpoints as ck
from distill.train.distributed import Dist
from distill.train.precision import Precision
from distill.train.signals import EXIT_NO_SPACE

ROOT = Path(__file__).resolve().parent.parent


def draws() -> tuple:
    return (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), np.random.randn(), torch.rand(3).tolist())


def test_a_resume_on_a_machine_with_fewer_gpus_sets_the_states_of_the_gpus_it_has(monkeypatch):
    state = {**ck.rng_state(), "cuda": [torch.full((16,), i, dtype=torch.uint8) for i in range(4)]}
    given = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", given.extend)
    ck.set_rng_state(state)
    assert [int(s[0]) for s in given] == [0, 1]


def test_rng_states_survive_a_weights_only_round_trip_and_replay_the_same_draws(tmp_path):
    random.seed(3)
    np.random.seed(4)
    torch.manual_seed(5)
    random.gauss(0, 1)  # python's gauss keeps a spare draw: it must come back too
    np.random.randn()  # numpy's likewise (has_gauss, cached_gaussian)
    state = ck.rng_state()
    expected = draws()
    torch.save(state, tmp_path / "rng.pt")
    draws()  # move every generator on
    ck.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert draws() == expected


def tiny_training_state(precision_mode="fp32"):
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.LayerNorm(5))
    mode, _, level = precision_mode.partition("-")
    precision = Precision.from_config(mode, level or "O2", device="cpu", allow_cpu_fp16=True)
    module = precision.prepare(module)
    optimizer = precision.make_optimizer([{"params": list(module.parameters()), "weight_decay": 0.01}],
                                         torch.optim.AdamW, lr=1e-2, betas=(0.9, 0.98), eps=1e-6)
    scheduler = get_linear_schedule_with_warmup(optimizer, 2, 10)
    for _ in range(3):
        with precision.autocast():
            loss = module(torch.randn(4, 6).to(next(module.parameters()).dtype)).float().pow(2).mean()
        precision.backward(loss)
        precision.step(optimizer, 1.0)
        scheduler.step()
    return module, optimizer, scheduler, precision


def save(tmp_path, step, parts, limit=2):
    cfg = make_config({"output_dir": str(tmp_path), "save_total_limit": limit})
    ck.save_checkpoint(tmp_path, step, *parts, ck.RunStats(skipped=1, tokens=99), cfg, Dist())


@pytest.mark.parametrize("mode", ["fp32", "bf16", "fp16-O1", "fp16-O2"])
def test_a_saved_checkpoint_loads_with_weights_only_and_restores_every_state(tmp_path, mode):
    parts = tiny_training_state(mode)
    save(tmp_path, 3, parts)
    path = ck.latest_checkpoint(tmp_path)
    assert path == tmp_path / "checkpoints" / "step-00000003"
    state = torch.load(path / "state.pt", weights_only=True)  # no code runs: tensors and plain values only
    fresh = tiny_training_state(mode)
    for p in fresh[0].parameters():
        p.data.add_(1.0)
    step, stats = ck.load_checkpoint(path, *fresh, Dist())
    assert (step, stats.skipped, stats.tokens) == (3, 1, 99)
    for a, b in zip(parts[0].state_dict().values(), fresh[0].state_dict().values()):
        assert torch.equal(a, b)
    assert fresh[2].state_dict() == parts[2].state_dict()
    assert fresh[3].state_dict().keys() == parts[3].state_dict().keys()
    assert str(fresh[1].state_dict()) == str(parts[1].state_dict())
    assert state["precision"]["mode"] == parts[3].mode


def test_the_manifest_names_each_file_with_its_size_and_sha256_and_no_temp_folder_is_left(tmp_path):
    save(tmp_path, 4, tiny_training_state())
    folder = tmp_path / "checkpoints" / "step-00000004"
    manifest = json.loads((folder / "manifest.json").read_text())
    data = (folder / "state.pt").read_bytes()
    assert manifest["files"] == {"state.pt": {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}}
    assert manifest["step"] == 4
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000004"]


def damage(folder: Path, how: str) -> None:
    state = folder / "state.pt"
    if how == "truncated":
        os.truncate(state, state.stat().st_size // 2)
    elif how == "emptied":  # what a crash leaves of an unsynced file renamed into place
        os.truncate(state, 0)
    elif how == "flipped":
        data = bytearray(state.read_bytes())
        data[len(data) // 2] ^= 0xFF
        state.write_bytes(bytes(data))
    elif how == "no manifest":
        (folder / "manifest.json").unlink()


@pytest.mark.parametrize("how", ["truncated", "emptied", "flipped", "no manifest"])
def test_a_damaged_newest_checkpoint_is_reported_in_one_line_and_the_previous_one_used(tmp_path, capsys, how):
    parts = tiny_training_state()
    save(tmp_path, 10, parts, limit=3)
    save(tmp_path, 20, parts, limit=3)
    damage(tmp_path / "checkpoints" / "step-00000020", how)
    capsys.readouterr()
    assert ck.latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step-00000010"
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "step-00000020" in lines[0] and "resuming from step-00000010" in lines[0], lines
    ck.latest_checkpoint(tmp_path)  # asked again (the loop asks twice): no second line
    assert capsys.readouterr().err == ""


def test_no_whole_checkpoint_means_none_and_a_single_file_checkpoint_of_an_older_version_is_not_loaded(tmp_path,
                                                                                                     capsys):
    save(tmp_path, 5, tiny_training_state())
    damage(tmp_path / "checkpoints" / "step-00000005", "truncated")
    assert ck.latest_checkpoint(tmp_path) is None
    assert "no older checkpoint is whole" in capsys.readouterr().err
    legacy = tmp_path / "legacy"
    (legacy / "checkpoints").mkdir(parents=True)
    torch.save({"step": 1}, legacy / "checkpoints" / "step-00000001.pt")
    assert ck.latest_checkpoint(legacy) is None
    assert "older version" in capsys.readouterr().err


def test_pruning_keeps_the_new_checkpoint_whatever_the_limit_and_drops_a_damaged_newer_one(tmp_path):
    parts = tiny_training_state()
    for step in (10, 20, 30):
        save(tmp_path, step, parts, limit=5)
    damage(tmp_path / "checkpoints" / "step-00000030", "truncated")
    # a resumed run (from step 20) saves step 25 with limit 1: 25 stays, the damaged 30 and the older ones go
    save(tmp_path, 25, parts, limit=1)
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["step-00000025"]
    assert ck.check_checkpoint(tmp_path / "checkpoints" / "step-00000025") is None
    save(tmp_path, 26, parts, limit=2)
    save(tmp_path, 27, parts, limit=2)
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["step-00000026", "step-00000027"]


def test_a_leftover_temp_folder_of_a_killed_save_is_ignored_then_cleaned(tmp_path):
    parts = tiny_training_state()
    save(tmp_path, 10, parts)
    leftover = tmp_path / "checkpoints" / ".step-00000020.tmp-abc"
    leftover.mkdir()
    (leftover / "state.pt").write_bytes(b"half")
    assert ck.latest_checkpoint(tmp_path).name == "step-00000010"
    save(tmp_path, 20, parts)
    assert not leftover.exists()


def test_a_step_saved_again_keeps_a_whole_copy_and_replaces_a_damaged_one_without_a_moment_of_none(tmp_path,
                                                                                                   monkeypatch):
    """The non-finite stop saves the step just saved: the whole copy stays as it was (its RNG states are the
    exact ones); a damaged copy is replaced, and at no point is the step's folder removed before the new one
    is in place (with save_total_limit 1 it may be the only checkpoint)."""
    parts = tiny_training_state()
    save(tmp_path, 4, parts, limit=1)
    folder = tmp_path / "checkpoints" / "step-00000004"
    before = (folder / "state.pt").read_bytes()
    parts[0][0].weight.data.add_(1.0)  # a later state under the same step number
    save(tmp_path, 4, parts, limit=1)
    assert (folder / "state.pt").read_bytes() == before
    damage(folder, "truncated")
    seen = []
    real_rmtree = ck.shutil.rmtree

    def watched(path, *args, **kwargs):  # whenever anything is removed, step 4 must be whole in place
        seen.append(ck.check_checkpoint(folder))
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(ck.shutil, "rmtree", watched)
    save(tmp_path, 4, parts, limit=1)
    assert seen and all(problem is None for problem in seen)
    assert ck.check_checkpoint(folder) is None and (folder / "state.pt").read_bytes() != before
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000004"]


def test_a_checkpoint_that_cannot_be_read_is_damaged_and_the_previous_one_used(tmp_path, monkeypatch, capsys):
    parts = tiny_training_state()
    save(tmp_path, 10, parts, limit=3)
    save(tmp_path, 20, parts, limit=3)
    real = ck.file_digest

    def failing(path):
        if "step-00000020" in str(path):
            raise OSError(5, "Input/output error")
        return real(path)

    monkeypatch.setattr(ck, "file_digest", failing)
    assert ck.latest_checkpoint(tmp_path).name == "step-00000010"
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "step-00000020" in line and "cannot be read (Input/output error)" in line


FULL_DISK = textwrap.dedent("""
    import resource, signal, sys, torch
    from pathlib import Path
    from distill.settings.config import make_config
    from distill.train import checkpoints as ck
    from distill.train.distributed import Dist
    from tests.test_checkpoints import tiny_training_state
    out = Path(sys.argv[1])
    parts = tiny_training_state()
    cfg = make_config({"output_dir": str(out), "save_total_limit": 1})
    ck.save_checkpoint(out, 1, *parts, ck.RunStats(), cfg, Dist())
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing the process
    limit = (out / "checkpoints" / "step-00000001" / "state.pt").stat().st_size + 20000
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    parts[0].add_module("big", torch.nn.Linear(200, 200))  # the next checkpoint no longer fits
    ck.save_checkpoint(out, 2, *parts, ck.RunStats(), cfg, Dist())
    print("not reached")
""")


@pytest.mark.slow  # a fresh interpreter importing torch and transformers: about 12 s on 2 cores
def test_a_write_that_hits_the_file_size_limit_ends_in_one_line_and_keeps_the_previous_checkpoint(tmp_path):
    done = subprocess.run([sys.executable, "-c", FULL_DISK, str(tmp_path)], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert done.returncode == EXIT_NO_SPACE, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert str(tmp_path / "checkpoints") in lines[0] and "file too large" in lines[0]
    assert "MiB" in lines[0] and "step-00000001 is intact" in lines[0] and "--resume" in lines[0]
    assert "not reached" not in done.stdout
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-00000001"]
    assert ck.check_checkpoint(tmp_path / "checkpoints" / "step-00000001") is None
