"""MiniLMv2's relation terms: the engine's relation loss against the same formula composed of autograd operations.

    python -m bench.relations                   # the study's shapes: 6 x 384 teacher, 3-layer student, 16 x 128
    python -m bench.relations --quick           # 3 rounds
    python -m bench.relations --precision fp32  # default: auto (distill-train's choice for this machine)

``distill.objective.losses.relation_kl`` computes the loss and the student's gradient in one pass of tensor operations
(``losses._RelationKL``): autograd keeps none of the ``[B, relation_heads, S, S]`` maps. ``composed`` is the
same formula written as autograd operations, swapped in for ``_RelationKL`` only (the inputs are prepared as the
engine prepares them), so the ratio is the one-pass computation's alone; the engine's implementation before it
also masked and gathered on packed batches, so its step was slower than ``composed`` (``python -m bench.study
--remeasure_distill`` compares a whole run's speed with the run's own). Both are timed in interleaved rounds on (1) the loss alone, forward and backward, for the query, key
and value vectors of one layer pair, and (2) one whole distillation step of ``qq_rel + kk_rel + vv_rel``
(teacher forward, student forward, loss, backward, grad-norm clip, fused AdamW step), as the study's relations row
runs it.
Random weights: the speed does not depend on them. Prints one ``name: value`` line per figure.
"""

from __future__ import annotations

import argparse
import math
import sys
from contextlib import contextmanager
from unittest import mock

import torch

from bench.common import (
    Clock,
    command_line,
    interleaved,
    log,
    machine,
)
from bench.two_way import two_way_ending, two_way_flags, two_way_setup, two_way_step
from distill.models.student import build_student
from distill.objective import losses
from distill.objective.plan import Objective
from distill.train.step import StudentStep

WEIGHTS = {"qq_rel": 1.0, "kk_rel": 1.0, "vv_rel": 1.0}
LAYERS = [2, 4, 6]


def composed(xs, xt, key_invalid, count, grad_enabled=True):
    """``_RelationKL.apply``'s arguments and value, as autograd operations."""
    def log_relation(x):
        scores = x @ x.transpose(-1, -2) / math.sqrt(x.shape[-1])
        if key_invalid is not None:
            scores = scores.masked_fill(key_invalid, torch.finfo(scores.dtype).min)
        return scores.log_softmax(dim=-1)

    log_r_s, log_r_t = log_relation(xs), log_relation(xt)
    return (log_r_t.exp() * (log_r_t - log_r_s)).sum() / max(count, 1)


@contextmanager
def implementation(name: str):
    if name == "fused":
        yield
        return
    with mock.patch.object(losses._RelationKL, "apply", composed):
        yield


def models(device, width: int, heads: int, teacher_layers: int, vocab: int):
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    config = BertConfig(vocab_size=vocab, hidden_size=width, num_hidden_layers=teacher_layers,
                        num_attention_heads=heads, intermediate_size=4 * width, max_position_embeddings=512)
    teacher = BertForMaskedLM(config).to(device).eval().requires_grad_(False)
    student, _ = build_student(teacher, LAYERS)
    return teacher, student.to(device).train()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="3 timed rounds (default 5)")
    p.add_argument("--batch", type=int, default=16, help="sequences per step (the study's 16)")
    p.add_argument("--seq", type=int, default=128, help="tokens per sequence, packed: no padding (the study's 128)")
    p.add_argument("--width", type=int, default=384, help="hidden width of both models (all-MiniLM-L6-v2's 384)")
    p.add_argument("--relation_heads", type=int, default=48, help="MiniLMv2's 48")
    two_way_flags(p, precision="auto")
    args = p.parse_args(argv)
    threads_why, device, precision_name, prec = two_way_setup(p, args)
    teacher, student = models(device, args.width, args.width // 32, 6, 30522)
    objective = Objective.from_config(WEIGHTS, student_config=student, teacher_config=teacher, student_layers=LAYERS,
                                      relation_heads=args.relation_heads).to(device)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 30000, (args.batch, args.seq), generator=g)
    mask = torch.ones_like(ids)
    batch = {"input_ids": ids, "attention_mask": mask}
    optimizer = prec.make_optimizer(list(student.parameters()), torch.optim.AdamW, lr=1e-4)
    xs = [torch.randn(args.batch, args.seq, args.width, generator=g).requires_grad_(True) for _ in range(3)]
    xt = [torch.randn(args.batch, args.seq, args.width, generator=g) for _ in range(3)]

    def loss_only(name):
        def run():
            with implementation(name):
                total = sum(losses.relation_kl(s, t, mask, args.relation_heads) for s, t in zip(xs, xt))
                total.backward()
        return run

    engine = StudentStep(student, objective, teacher)  # distill-train's step module

    def step(name):
        return two_way_step(engine, prec, optimizer, batch, lambda: implementation(name))

    # the two implementations agree before anything is timed
    values = {}
    for name in ("fused", "composed"):
        with implementation(name):
            values[name] = float(sum(losses.relation_kl(s, t, mask, args.relation_heads) for s, t in zip(xs, xt)))
    difference = abs(values["fused"] - values["composed"]) / max(abs(values["composed"]), 1e-12)
    if difference > 1e-5:
        print(f"error: the two implementations disagree (relative difference {difference:.2e} > 1e-5): "
              "nothing was timed", file=sys.stderr)
        return 1
    repeats = 3 if args.quick else 5
    clock = Clock(device)
    log("loss alone (3 vector kinds, forward + backward):")
    loss_runs = interleaved({"composed": loss_only("composed"), "fused": loss_only("fused")}, repeats, 1, clock)
    log(f"distillation step ({precision_name}):")
    step_runs = interleaved({"composed": step("composed"), "fused": step("fused")}, repeats, 1, clock)
    tokens = args.batch * args.seq
    report = {
        "command": command_line("bench.relations", sys.argv[1:] if argv is None else list(argv)),
        "machine": machine(), "threads": torch.get_num_threads(), "threads_why": threads_why,
        "precision": precision_name,
        "setup": {"batch": args.batch, "seq": args.seq, "width": args.width, "relation_heads": args.relation_heads,
                  "teacher_layers": 6, "student_layers": LAYERS, "terms": WEIGHTS},
        "loss_relative_difference": difference,
    }
    two_way_ending(report, {"loss": loss_runs, "step": step_runs}, "composed", "fused", tokens, args.out,
                   {"loss": "relation_loss_speedup", "step": "relation_step_speedup"},
                   ("loss_relative_difference", difference))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
