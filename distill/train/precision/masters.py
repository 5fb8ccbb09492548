"""fp32 master weights for fp16 O2: the copies the optimiser updates, paired with the fp16 weights the model runs.

The life of one pair, as apex's O2 keeps it:

1. :meth:`MasterWeights.remember` (from ``prepare``, just before the cast): the exact
   fp32 value of a trainable parameter, so the master starts equal to the weight the
   user loaded, not to its fp16 rounding;
2. :meth:`MasterWeights.claim` (from ``make_optimizer``): each fp16 parameter of the
   optimiser's groups is replaced by a new fp32 ``nn.Parameter``; fp32 ones (norms,
   unprepared modules) are their own masters;
3. every step: :meth:`grads_to_masters` (fp16 grads widened into the masters' .grad),
   the optimiser steps the masters, :meth:`copy_to_model` rounds them back into the
   fp16 weights.

Checkpoints hold the masters' values (:meth:`state`); the optimiser's state dict holds
only their Adam moments. DDP broadcasts the fp16 model weights from rank 0, not the
masters, so :meth:`broadcast` does that for them.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from distill.common.errors import UsageError

log = logging.getLogger(__package__)


class MasterWeights:
    """The (fp16 model parameter, fp32 master) pairs of one O2 run, in optimiser order."""

    def __init__(self):
        self._exact = WeakIdKeyDictionary()  # fp16-cast param -> its fp32 value before the cast
        self.pairs: list[tuple[nn.Parameter, nn.Parameter]] = []
        self.built = False  # claim() has run: the masters exist
        self._check = False  # verify model == master.half() once before the next step
        self._pending: list[torch.Tensor] | None = None  # masters loaded before claim()

    def remember(self, param: nn.Parameter) -> None:
        """Keep ``param``'s fp32 value (call it before casting ``param`` to fp16)."""
        self._exact[param] = param.detach().clone()

    def claim(self, params_or_groups) -> list[dict]:
        """The optimiser's groups over masters: each fp16 parameter replaced by its fp32 master, options kept.

        ``params_or_groups``: parameters, or dicts ``{"params": [...], **options}``. A
        parameter whose fp16 value no longer matches its remembered fp32 value (changed
        since ``prepare``, e.g. by a DDP broadcast) gets a master widened from fp16.
        """
        groups = list(params_or_groups)
        if groups and not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        master_groups = []
        with torch.no_grad():
            for group in groups:
                params = group["params"]
                params = [params] if isinstance(params, torch.Tensor) else list(params)
                masters = []
                for param in params:
                    if param.dtype != torch.float16:
                        masters.append(param)
                        continue
                    fp32 = self._exact.pop(param, None)
                    if fp32 is None or not torch.equal(fp32.to(param.device, torch.float16), param):
                        fp32 = param.detach().float()  # changed since prepare() (e.g. a DDP broadcast)
                    master = nn.Parameter(fp32.to(param.device, torch.float32), requires_grad=param.requires_grad)
                    self.pairs.append((param, master))
                    masters.append(master)
                master_groups.append({**group, "params": masters})
        if not self.pairs:
            raise UsageError("fp16 O2: make_optimizer found no fp16 parameters: call precision.prepare(model) "
                             "before building the optimiser")
        self._exact = WeakIdKeyDictionary()  # copies not claimed by the optimiser are not needed
        self.built = True
        return master_groups

    def ready(self) -> None:
        """After the optimiser over the masters exists: apply masters loaded early, share rank 0's, set the model."""
        if self._pending is not None:
            self._load(self._pending)
            self._pending = None
        self.broadcast()
        self.copy_to_model()
        self._check = True

    # ------------------------------------------------------------------ per step
    def grads_to_masters(self) -> None:
        """Before the first step after the masters were set, reset any that went stale; then widen the grads."""
        if self._check:
            self._resync_changed()
        with torch.no_grad():
            for param, master in self.pairs:
                master.grad = None if param.grad is None else param.grad.float()

    def copy_to_model(self) -> None:
        """Round every master into its fp16 model weight."""
        with torch.no_grad():
            for param, master in self.pairs:
                param.copy_(master)

    def zero_model_grads(self) -> None:
        for param, _ in self.pairs:
            param.grad = None

    def master_of(self) -> dict[int, torch.Tensor]:
        """id(fp16 model parameter) -> its fp32 master."""
        return {id(p): m for p, m in self.pairs}

    # ------------------------------------------------------------------ checkpoints
    def state(self) -> list[torch.Tensor] | None:
        """Copies of the masters' values, in optimiser order (None before claim() with nothing loaded)."""
        masters = [m.detach() for _, m in self.pairs] if self.built else self._pending
        return [m.clone() for m in masters] if masters is not None else None

    def load(self, masters: list[torch.Tensor]) -> None:
        """Set the masters (and the model's fp16 weights) from :meth:`state`; before claim() they wait for it."""
        if not self.built:
            self._pending = [m.clone() for m in masters]
            return
        self._load(masters)
        self.copy_to_model()
        self._check = True

    def _load(self, masters) -> None:
        if len(masters) != len(self.pairs):
            raise UsageError(f"the checkpoint holds {len(masters)} fp32 master weights and this run's optimiser "
                             f"has {len(self.pairs)}: the model or the parameter groups differ from the saved run")
        with torch.no_grad():
            for (_, master), saved in zip(self.pairs, masters):
                if saved.shape != master.shape:
                    raise UsageError(f"a saved master weight has shape {tuple(saved.shape)} where this run's "
                                     f"has {tuple(master.shape)}: the model differs from the saved run")
                master.copy_(saved)

    # ------------------------------------------------------------------ consistency
    def _resync_changed(self) -> None:
        """A model weight changed behind the optimiser's back (e.g. ``model.load_state_dict`` after
        make_optimizer) wins over its stale master, loudly."""
        self._check = False
        changed = 0
        with torch.no_grad():
            differs = [(master.to(torch.float16) != param).any() for param, master in self.pairs]
            if not differs or not bool(torch.stack(differs).any()):  # one device sync, once
                return
            for (param, master), flag in zip(self.pairs, differs):
                if flag:
                    master.copy_(param.float())
                    changed += 1
        if changed:
            log.warning("precision: %d fp16 weights were changed after the optimiser was built (without "
                        "precision.load_state_dict); their fp32 masters were reset from the fp16 weights", changed)

    def broadcast(self) -> None:
        """With torch.distributed initialised: every rank takes rank 0's masters."""
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            with torch.no_grad():
                for _, master in self.pairs:
                    dist.broadcast(master.data, src=0)
