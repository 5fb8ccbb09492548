"""fp16 O2: fp16 weights except normalisation layers, fp32 master weights in the optimiser, dynamic loss scaling.

The forward runs under autocast fp16, so fp32 norms and fp16 activations mix. The
optimiser steps fp32 masters (:mod:`distill.train.precision.masters`) whose gradients are the
fp16 model gradients widened, so the O1 scaler does the unscale / inf check / skip /
rescale on them unchanged.
"""

from __future__ import annotations

from torch import nn

from distill.common.errors import UsageError
from distill.train.precision.base import cast_to_fp16
from distill.train.precision.fp16_o1 import Fp16O1
from distill.train.precision.masters import MasterWeights


class Fp16O2(Fp16O1):
    modes = (("native", "fp16 O2"),)
    summary = "fp16 O2 (native torch.amp; fp16 weights, fp32 norms and master weights, dynamic loss scale)"
    keeps_masters = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.masters = MasterWeights()

    def prepare(self, model: nn.Module) -> nn.Module:
        cast_to_fp16(model, keep_norms=True, before_cast=self.masters.remember)
        return model

    def _build_optimizer(self, params_or_groups, optimizer_cls, **kwargs):
        optimizer = optimizer_cls(self.masters.claim(params_or_groups), **kwargs)
        self.masters.ready()
        return optimizer

    def step(self, optimizer, max_grad_norm=None):
        self._check_optimizer(optimizer)
        if self._optimizer is None:
            raise UsageError("fp16 O2 needs its optimiser built by precision.make_optimizer (fp32 master weights)")
        return super().step(optimizer, max_grad_norm)

    def _before_step(self) -> None:
        self.masters.grads_to_masters()

    def _after_update(self) -> None:
        self.masters.copy_to_model()

    def _zero_grads(self, optimizer) -> None:
        super()._zero_grads(optimizer)
        self.masters.zero_model_grads()

    def state_dict(self) -> dict:
        return {**super().state_dict(), "masters": self.masters.state()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.masters.load(state["masters"])

    def _master_of(self):
        return self.masters.master_of()
