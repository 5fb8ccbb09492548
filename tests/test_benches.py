"""The speed bench's smoke mode: every code path of bench/speed.py on tiny models (the figures mean nothing there).

A bench that no test runs breaks silently when the engine changes under it (the floor once read ``.float()`` of a
deferred vocabulary head); this runs it as a user would, in its own process.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


@pytest.mark.slow
def test_speed_bench_smoke_runs_every_path_and_prints_each_figure(tmp_path):
    out = tmp_path / "speed.json"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "speed.py"), "--smoke", "--out", str(out)],
                          capture_output=True, text=True, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    printed = dict(line.split(": ", 1) for line in done.stdout.splitlines() if ": " in line and " " not in line.split(":")[0])
    for figure in ("distill_step_vs_plain_masked", "distill_step_vs_plain_full", "distill_step_over_floor",
                   "prep_vs_loop", "student4_vs_teacher_inference"):
        assert float(printed[figure]) > 0, figure
    assert out.exists()
