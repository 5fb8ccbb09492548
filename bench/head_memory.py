"""Peak memory of one DistilBERT distillation step with the vocabulary head chunked (the default) and whole.

    python -m bench.head_memory                  # batch 8 x 128, BERT-base teacher, 1,5,8,12 student, fp32
    python -m bench.head_memory --batch 16

Each variant runs in a fresh process (one warm-up step, then the measured one), ``ce`` over every real token:
the step of ``bench.peers``' ``ours_full``. The figure is the rise of the process's resident set
(VmHWM, reset before the step) above what it held before, with glibc's trim and mmap thresholds fixed at
64 KiB so that freed memory is returned and the rise is the step's peak of live memory. Linux only.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {"chunked (logit_chunk_rows 0, auto)": 0, "whole head (logit_chunk_rows -1)": -1}


def child(rows: int, batch_size: int) -> None:
    import torch

    from bench import peers
    from bench.common import make_batch

    torch.set_num_threads(1)
    teacher, student = peers.agnostic_models(torch.device("cpu"))
    batch = make_batch(batch_size, teacher.config.vocab_size)
    ours = peers.OursAgnostic(teacher, student.train(), peers.AGNOSTIC_LAYERS, False, logit_chunk_rows=rows)
    prec = peers.Precision.from_config("fp32", device=torch.device("cpu"))
    opt = prec.make_optimizer(list(student.parameters()), torch.optim.AdamW, **peers.AGNOSTIC_OPTIM)

    def step():
        prec.backward(ours.loss(batch))
        prec.step(opt, peers.AGNOSTIC_CLIP)

    step()  # AdamW's state and every buffer exist from here on

    def status(key: str) -> int:
        with open("/proc/self/status") as f:
            return int(f.read().split(key + ":")[1].split()[0])

    base = status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident set
    step()
    print(json.dumps({"peak_rise_mb": round((status("VmHWM") - base) / 1024, 1)}))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=8, help="sequences of 128 tokens per step (default 8)")
    p.add_argument("--_child", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._child is not None:
        child(args._child, args.batch)
        return 0
    if args.batch < 1:
        print(f"error: --batch {args.batch}: give at least 1", file=sys.stderr)
        return 2
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MALLOC_TRIM_THRESHOLD_": "65536", "MALLOC_MMAP_THRESHOLD_": "65536"}
    peaks = {}
    for name, rows in VARIANTS.items():
        done = subprocess.run([sys.executable, "-m", "bench.head_memory", "--_child", str(rows), "--batch",
                               str(args.batch)], env=env, capture_output=True, text=True, check=True, cwd=ROOT)
        peaks[name] = json.loads(done.stdout.strip().splitlines()[-1])["peak_rise_mb"]
        print(f"{name}: {peaks[name]:.0f} MB")
    chunked, whole = peaks.values()
    print(f"batch {args.batch} x 128: the chunked head's step peaks at {chunked / whole:.2f} of the whole head's")
    return 0


if __name__ == "__main__":
    sys.exit(main())
