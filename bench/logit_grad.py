"""The chunked vocabulary head with the logit terms' own gradients (``TermSpec.logit_grad``) against autograd.

    python -m bench.logit_grad            # BERT-base shapes: 12 x 768 teacher, student of layers 1,5,8,12, 4 x 128
    python -m bench.logit_grad --quick    # 3 rounds
    python -m bench.logit_grad --batch 8  # 8 x 128, as bench.speed's full mode

Over a chunk of vocabulary-head rows, ``ce``, ``kl``, ``out_mse`` and ``mlm`` give their value and their gradient
with respect to the student's logits themselves (``distill/objective/losses.py``: ``*_grad``), so the chunked head builds no
autograd graph over the chunk's logits. ``autograd`` is the same engine with that withheld: autograd
differentiates each chunk's loss, as it did before ``logit_grad`` existed (and as it still does for a term without
one). Both are timed in interleaved rounds on (1) the head alone: the DistilBERT objective's logit terms
``5*ce + 2*mlm`` at T=2 over every token (the student's and the teacher's decoder, the terms, the backward into the
decoder's input and weights), and (2) one whole distillation step of ``5*ce + 2*mlm + 1*cos`` (teacher forward,
student forward, loss, backward, fused AdamW step, clip). It checks first that on the head the two give the same
loss and gradients (and times nothing if they do not); the whole step runs the same head. Random weights: the speed does not depend on them. Prints one
``name: value`` line per figure.
"""

from __future__ import annotations

import argparse
import copy
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
    make_batch,
    teacher_config,
)
from bench.two_way import two_way_ending, two_way_flags, two_way_setup, two_way_step
from distill.models.loading import Features, extract
from distill.models.student import build_student
from distill.models.vocab_head import DeferredLogits
from distill.objective import plan as objective_module
from distill.objective.plan import Objective
from distill.train.precision import Precision
from distill.train.step import StudentStep

LAYERS = [1, 5, 8, 12]
HEAD_WEIGHTS = {"ce": 5.0, "mlm": 2.0}
STEP_WEIGHTS = {"ce": 5.0, "mlm": 2.0, "cos": 1.0}
T = 2.0


@contextmanager
def implementation(name: str):
    """``logit_grad``: the engine as it is; ``autograd``: the chunked head without the terms' own gradients."""
    if name == "logit_grad":
        yield
        return
    real = objective_module.chunked

    def without_chunk_grad(chunk_loss, head, rows_per_chunk, scale=None, chunk_grad=None):
        return real(chunk_loss, head, rows_per_chunk, scale)

    with mock.patch.object(objective_module, "chunked", without_chunk_grad):
        yield


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-30))


class HeadAlone:
    """The vocabulary head alone: the student decoder's input rows as leaves, its decoder weights (and bias), the
    teacher's head outputs fixed; one call runs the objective's logit terms forward and backward one way."""

    def __init__(self, teacher, student, objective: Objective, batch: dict, prec):
        ids, mask = batch["input_ids"], batch["attention_mask"]
        with torch.no_grad(), prec.autocast():
            self.t_features = extract(teacher, ids, mask, **objective.extract_kwargs(batch, "teacher"))
            s_features = extract(student, ids, mask, **objective.extract_kwargs(batch, "student"))
        deferred = s_features.logits
        assert isinstance(deferred, DeferredLogits) and isinstance(self.t_features.logits, DeferredLogits)
        self.objective, self.batch, self.autocast = objective, batch, deferred.autocast
        self.decoder = copy.deepcopy(deferred.weight.detach()).requires_grad_(True)
        self.bias = None if deferred.bias is None else deferred.bias.detach().clone().requires_grad_(True)
        self.rows = deferred.hidden.detach().clone().requires_grad_(True)

    def leaves(self) -> list[torch.Tensor]:
        return [self.rows, self.decoder] + ([self.bias] if self.bias is not None else [])

    def __call__(self, name: str) -> torch.Tensor:
        for leaf in self.leaves():
            leaf.grad = None
        student_head = Features(logits=DeferredLogits(self.rows, self.decoder, self.bias, self.autocast))
        with implementation(name):
            total = self.objective(student_head, self.t_features, self.batch)[0]
            total.backward()
        return total.detach()

    def results(self, name: str) -> list[torch.Tensor]:
        """The loss and every leaf's gradient, one way."""
        total = self(name)
        return [total] + [leaf.grad.clone() for leaf in self.leaves()]

    def timed(self, name: str):
        def run():  # returns nothing: the clock reads a returned value as phase times
            self(name)
        return run


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="3 timed rounds (default 5)")
    p.add_argument("--batch", type=int, default=4, help="sequences per step (bench.peers' quick 4)")
    p.add_argument("--smoke", action="store_true", help="every path on a narrow teacher in seconds (no figures)")
    two_way_flags(p, precision="fp32")
    args = p.parse_args(argv)
    return args, two_way_setup(p, args)


def main(argv=None) -> int:
    args, (threads_why, device, precision_name, prec) = parse_args(argv)
    from transformers import BertForMaskedLM

    torch.manual_seed(0)
    shape = dict(hidden_size=32, num_attention_heads=2, intermediate_size=64) if args.smoke else {}
    teacher = BertForMaskedLM(teacher_config(**shape)).to(device).eval().requires_grad_(False)
    student, _ = build_student(teacher, LAYERS)
    student = student.to(device).train()
    batch = make_batch(args.batch, teacher.config.vocab_size)
    tokens = int(batch["attention_mask"].sum())

    def make_objective(weights):
        return Objective.from_config(weights, T, student_config=student, teacher_config=teacher,
                                     student_layers=LAYERS, restrict_ce_to_mask=False).to(device)

    # (1) the head alone; the two ways agree before anything is timed: the value and every gradient
    head = HeadAlone(teacher, student, make_objective(HEAD_WEIGHTS), batch, prec)
    results = {name: head.results(name) for name in ("logit_grad", "autograd")}
    difference = max(relative_difference(a, b) for a, b in zip(results["logit_grad"], results["autograd"]))
    if difference > 1e-4:
        print(f"error: the two ways disagree (largest relative difference {difference:.2e} > 1e-4 over the loss and "
              "the gradients): nothing was timed", file=sys.stderr)
        return 1

    # (2) one whole distillation step, each way with its own copy of the student and its own optimizer
    step_objective = make_objective(STEP_WEIGHTS)

    def step(name):
        own, own_prec = copy.deepcopy(student), Precision.from_config(precision_name, device=device)
        optimizer = own_prec.make_optimizer(list(own.parameters()), torch.optim.AdamW, lr=5e-4, betas=(0.9, 0.98),
                                            eps=1e-6, weight_decay=0.0)

        return two_way_step(StudentStep(own, step_objective, teacher), own_prec, optimizer, batch,
                            lambda: implementation(name))

    repeats = 1 if args.smoke else 3 if args.quick else 5
    clock = Clock(device)
    log(f"vocabulary head alone ({tokens} rows x {teacher.config.vocab_size}, {precision_name}):")
    head_runs = interleaved({"autograd": head.timed("autograd"), "logit_grad": head.timed("logit_grad")},
                            repeats, 1, clock)
    log(f"distillation step ({precision_name}):")
    step_runs = interleaved({"autograd": step("autograd"), "logit_grad": step("logit_grad")}, repeats, 1, clock)
    report = {
        "command": command_line("bench.logit_grad", sys.argv[1:] if argv is None else list(argv)),
        "machine": machine(), "threads": torch.get_num_threads(), "threads_why": threads_why,
        "precision": precision_name,
        "setup": {"batch": args.batch, "seq": batch["input_ids"].shape[1], "tokens": tokens, "student_layers": LAYERS,
                  "head_terms": HEAD_WEIGHTS, "step_terms": STEP_WEIGHTS, "temperature": T,
                  "restrict_ce_to_mask": False},
        "largest_relative_difference": difference,
    }
    two_way_ending(report, {"head": head_runs, "step": step_runs}, "autograd", "logit_grad", tokens, args.out,
                   {"head": "head_speedup", "step": "step_speedup"}, ("largest_relative_difference", difference))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
