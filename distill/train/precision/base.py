"""The one interface every precision mode implements, and what the modes share.

:class:`Precision` holds the shared step (clip, step, zero the gradients, count
overflows) and defaults that are right for plain training; each mode is a small
subclass in a module of its own that overrides only what it does differently
(autocast dtype, loss scaling, weight casts, master weights). A subclass names the
``(backend, mode)`` keys it implements in ``modes``, and :meth:`Precision.from_config`
builds the one registered for the mode a run resolves to.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from distill.common.errors import UsageError
from distill.common.hardware import choose_precision
from distill.train.precision.choose import (
    check_names,
    read_cpu_flags,
    resolve_precision,
)

log = logging.getLogger(__package__)  # "distill.train.precision", whichever mode's module logs

# Module classes kept in fp32 under O2 ("LayerNorm and friends"); any class whose name ends in "Norm"
# (T5LayerNorm, LlamaRMSNorm, ...) counts too.
_NORM_TYPES: tuple[type, ...] = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase) + (
    (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()
)

# (backend, mode) -> the class implementing it, filled by each subclass's ``modes``
MODES: dict[tuple[str, str], type[Precision]] = {}


def is_norm(module: nn.Module) -> bool:
    """True for normalisation layers, whose weights O2 keeps in fp32."""
    return isinstance(module, _NORM_TYPES) or type(module).__name__.endswith("Norm")


def cast_to_fp16(model: nn.Module, keep_norms: bool, before_cast=None) -> None:
    """Cast ``model``'s floating parameters and buffers to fp16 in place (O2 and O3).

    ``keep_norms``: normalisation layers stay fp32 (O2). ``p.data`` is replaced, so the
    Parameter objects survive and tied weights stay tied. ``before_cast(param)`` is
    called with each trainable parameter while it still holds its fp32 value.
    """
    keep_fp32 = set()
    if keep_norms:
        for module in model.modules():
            if is_norm(module):
                keep_fp32.update(id(t) for t in module.parameters())
                keep_fp32.update(id(t) for t in module.buffers())
    with torch.no_grad():
        for module in model.modules():
            for param in module.parameters(recurse=False):
                if id(param) in keep_fp32 or not param.is_floating_point() or param.dtype == torch.float16:
                    continue
                if before_cast is not None and param.requires_grad:
                    before_cast(param)
                param.grad = None
                param.data = param.data.to(torch.float16)
            for name, buf in module.named_buffers(recurse=False):
                if id(buf) not in keep_fp32 and buf.is_floating_point() and buf.dtype != torch.float16:
                    setattr(module, name, buf.to(torch.float16))


@dataclass(frozen=True)
class StepResult:
    """What one optimiser step did.

    skipped: the gradients overflowed (inf/nan) under loss scaling, so no update was made.
    grad_norm: total 2-norm of the unscaled gradients before clipping (inf/nan when skipped).
    scale: the loss scale after this step's update (the one the next backward uses); 1.0 when unscaled.
    """

    skipped: bool
    grad_norm: float
    scale: float


class Precision:
    """One object per run that owns autocast, loss scaling and (O2) the fp32 master weights.

    Build it with :meth:`from_config`. ``precision`` is the mode actually used (after
    any CPU fallback), ``opt_level`` is "O1"/"O2"/"O3" for fp16 and None otherwise,
    ``notes`` are the messages logged about the choice, ``description`` is one line
    for logs and the model card.

    This base class is plain training without autocast; the modes override:
    ``autocast_dtype``, :meth:`backward` / :meth:`_unscale` / :meth:`_apply_step`
    (loss scaling), :meth:`prepare` (weight casts), :meth:`_build_optimizer` and the
    step hooks (master weights), :meth:`state_dict` / :meth:`load_state_dict`.
    """

    modes: ClassVar[tuple[tuple[str, str], ...]] = ()  # the (backend, mode) keys this class implements
    backend: ClassVar[str] = "native"
    summary: ClassVar[str] = ""  # the description, before any note on a fallback
    autocast_dtype: ClassVar[torch.dtype | None] = None  # None: no autocast
    keeps_masters: ClassVar[bool] = False  # whether state_dict() holds fp32 master weights
    fused_optimizer: ClassVar[bool] = True  # torch Adam/AdamW built with fused=True (make_optimizer)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        for key in cls.__dict__.get("modes", ()):
            MODES[key] = cls

    def __init__(self, precision: str, opt_level: str | None, device: torch.device, *, init_scale: float = 2.0**16,
                 growth_interval: int = 2000, notes: list[str] | None = None, requested: str | None = None):
        self.precision = precision
        self.opt_level = opt_level if precision == "fp16" else None
        self.device = torch.device(device)
        self.notes = list(notes or [])
        self.requested = requested or self.mode
        self.auto_reason: str | None = None  # set when precision "auto" chose this mode: the line the run prints
        self.skipped_steps = 0
        self.scaler: torch.amp.GradScaler | None = None
        self._optimizer = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(
        cls,
        precision: str,
        fp16_opt_level: str = "O2",
        *,
        device: torch.device | str,
        force_o3: bool = False,
        amp_backend: str = "native",
        allow_cpu_fp16: bool = False,
        init_scale: float = 2.0**16,
        growth_interval: int = 2000,
        cpu_flags: frozenset[str] | None = None,
    ) -> Precision:
        """Validate the config fields and build the Precision for ``device``.

        Raises UsageError for unknown values, O3 without ``force_o3``, fp16 on a CPU
        without bf16 instructions, and ``amp_backend="apex"`` without ``apex.amp``.
        ``cpu_flags``: the CPU's feature flags; None reads /proc/cpuinfo (tests inject a set).
        """
        device = torch.device(device)
        # "auto": the machine decides (distill.common.hardware); explicit choices pass through unchanged
        precision, fp16_opt_level, auto_reason = choose_precision(precision, fp16_opt_level, device.type, cpu_flags)
        level = check_names(precision, fp16_opt_level, amp_backend, force_o3)
        requested = f"fp16 {level}" if precision == "fp16" else precision
        if amp_backend != "native":
            _backend_class(amp_backend).check_usable(precision, device)
        if cpu_flags is None and device.type == "cpu":
            cpu_flags = read_cpu_flags()
        effective, notes = resolve_precision(precision, device.type, cpu_flags, allow_cpu_fp16)
        if effective == "fp16" and level == "O3":
            notes.append("fp16 O3 forced: pure fp16 weights and optimiser state without master weights or loss "
                         "scaling; expect the loss not to go down (O2 is the fp16 mode that trains)")
        if effective == "bf16" and device.type == "cuda" and torch.cuda.is_available() \
                and not torch.cuda.is_bf16_supported():
            notes.append("this GPU has no native bf16 (pre-Ampere): use --precision fp16 (O2) for speed")
        if effective != precision:  # fell back to bf16: O3 and apex no longer apply
            amp_backend = "native"
        mode = f"fp16 {level}" if effective == "fp16" else effective
        prec = MODES[(amp_backend, mode)](effective, level, device, init_scale=init_scale,
                                          growth_interval=growth_interval, notes=notes, requested=requested)
        prec.auto_reason = auto_reason
        for note in prec.notes:
            log.warning("precision: %s", note)
        return prec

    @classmethod
    def check_usable(cls, precision: str, device: torch.device) -> None:
        """Refuse a backend that cannot run here (before any device fallback). Native torch always can."""

    @property
    def mode(self) -> str:
        return f"fp16 {self.opt_level}" if self.precision == "fp16" else self.precision

    @property
    def description(self) -> str:
        """One line for logs and the model card, e.g. ``fp16 O2 (native torch.amp; ...)``."""
        text = self.summary
        if self.requested != self.mode:
            text += f" [asked for {self.requested}; fp16 is a CUDA mode, so bf16 on this CPU]"
        return text

    @property
    def scales_loss(self) -> bool:
        """True when backward() scales the loss (fp16 O1/O2): overflows are then skipped steps, not errors."""
        return self.scaler is not None

    @property
    def loss_scale(self) -> float:
        """The current loss scale (1.0 when the mode does not scale)."""
        return float(self.scaler.get_scale()) if self.scaler is not None else 1.0

    # ------------------------------------------------------------------ model and optimiser
    def prepare(self, model: nn.Module) -> nn.Module:
        """Cast ``model`` in place for O2 (fp16 except norms) or O3 (all fp16); a no-op otherwise.

        Call it on every trained module (student, learned projections) after moving
        it to the device and before :meth:`make_optimizer`; wrapping in DDP may come
        after. Parameter objects are kept (``p.data`` is replaced), so tied weights
        stay tied. Under O2 the fp32 values of the cast trainable parameters are kept
        to become the exact master weights. Returns ``model``.
        """
        return model

    def make_optimizer(self, params_or_groups, optimizer_cls=torch.optim.AdamW, **kwargs) -> torch.optim.Optimizer:
        """Build ``optimizer_cls(params_or_groups, **kwargs)``; under O2 over fp32 master weights.

        ``params_or_groups`` is what torch optimisers take: parameters, or dicts
        ``{"params": [...], **group_options}`` (e.g. the student and a projection with
        their own lr). Under O2 each fp16 parameter is replaced in its group by an fp32
        master (its exact pre-``prepare`` value); fp32 parameters (norms, unprepared
        modules) are their own masters. With torch.distributed initialised, masters are
        broadcast from rank 0, so DDP may wrap the model before or after this call.
        torch's Adam and AdamW are built with ``fused=True`` on a CPU or CUDA device unless
        ``fused`` or ``foreach`` is given.
        """
        if self._optimizer is not None:
            raise UsageError("make_optimizer was called twice on one Precision: build one optimiser per run")
        if self.fused_optimizer and optimizer_cls in (torch.optim.Adam, torch.optim.AdamW) \
                and self.device.type in ("cpu", "cuda") and not {"fused", "foreach"} & set(kwargs):
            # one kernel over all parameters instead of a Python loop over them: at BERT-base student size
            # the AdamW step is about 5x faster on a CPU (python -m bench.peers)
            kwargs = {**kwargs, "fused": True}
        self._optimizer = self._build_optimizer(params_or_groups, optimizer_cls, **kwargs)
        return self._optimizer

    def _build_optimizer(self, params_or_groups, optimizer_cls, **kwargs) -> torch.optim.Optimizer:
        return optimizer_cls(params_or_groups, **kwargs)

    # ------------------------------------------------------------------ per step
    def autocast(self):
        """Context manager for the forward pass and loss: torch.autocast where the mode autocasts, and,
        where backward() scales the loss, that scale for gradients taken inside the forward (the chunked
        vocabulary head's, :func:`distill.models.vocab_head.gradient_scale`), so they keep its range."""
        if self.autocast_dtype is None and not self.scales_loss:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        if self.autocast_dtype is not None:
            stack.enter_context(torch.autocast(self.device.type, dtype=self.autocast_dtype))
        if self.scales_loss:
            from distill.models.vocab_head import gradient_scale

            stack.enter_context(gradient_scale(self.loss_scale))
        return stack

    def backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()``, scaled by the loss scale under fp16 O1/O2.

        Call once per micro-batch (divide the loss by the number of micro-batches
        yourself); the scale only changes in :meth:`step`, so accumulated gradients
        share one scale.
        """
        loss.backward()

    def step(self, optimizer: torch.optim.Optimizer, max_grad_norm: float | None = None) -> StepResult:
        """Finish one optimiser step and zero all gradients.

        fp16 O1/O2: (O2: copy the fp16 model gradients into the fp32 masters' .grad,)
        unscale, check for inf/nan, clip the total norm to ``max_grad_norm``, step, or
        on overflow skip the step and halve the scale (counted in ``skipped_steps``);
        update the scale; (O2: copy masters into the fp16 model weights). Other modes:
        clip and step. ``max_grad_norm`` None or <= 0 means no clipping.
        """
        self._check_optimizer(optimizer)
        self._before_step()
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not params:  # nothing to apply (GradScaler would refuse a step with no inf check)
            self._zero_grads(optimizer)
            return StepResult(skipped=False, grad_norm=0.0, scale=self.loss_scale)
        self._unscale(optimizer, params)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip_value(max_grad_norm)))
        skipped, scale = self._apply_step(optimizer)
        if skipped:
            self.skipped_steps += 1
            log.info("precision: gradient overflow, step skipped; loss scale lowered to %g", scale)
        else:
            self._after_update()
        self._zero_grads(optimizer)
        return StepResult(skipped=skipped, grad_norm=grad_norm, scale=scale)

    def _check_optimizer(self, optimizer) -> None:
        if optimizer is not self._optimizer and self._optimizer is not None:
            raise UsageError("Precision.step got an optimiser that make_optimizer did not build")

    def _before_step(self) -> None:
        """Hook: before the gradients are read (O2 moves them into the masters here)."""

    def _unscale(self, optimizer, params) -> None:
        """Hook: divide the gradients by the loss scale, in place (no-op where the loss is not scaled)."""

    def _apply_step(self, optimizer) -> tuple[bool, float]:
        """Step the optimiser; return ``(skipped, loss scale for the next step)``."""
        optimizer.step()
        return False, 1.0

    def _after_update(self) -> None:
        """Hook: after an update was applied (O2 copies the masters into the model here)."""

    def _zero_grads(self, optimizer) -> None:
        optimizer.zero_grad(set_to_none=True)

    # ------------------------------------------------------------------ checkpoints and export
    def state_dict(self) -> dict:
        """Scaler state, skipped-step count and (O2) the fp32 master weights, for exact resume.

        Save it next to the model's and optimiser's state dicts; the optimiser's holds
        the master weights' Adam moments but not their values.
        """
        return {"mode": self.mode, "skipped_steps": self.skipped_steps, "scaler": {}}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`; under O2 the model's fp16 weights become the loaded masters cast to fp16.

        Call after the model's and optimiser's ``load_state_dict`` (or before
        ``make_optimizer``: the masters are then applied when it builds them).
        """
        if self.keeps_masters != (state.get("masters") is not None):
            raise UsageError(
                f"the checkpoint's precision state is from {state.get('mode')!r} and this run is {self.mode!r}: "
                "only fp16 O2 keeps fp32 master weights, so resume with the precision the run was started with "
                "(or start a new run from the saved model weights)"
            )
        if state.get("mode") != self.mode:
            log.warning("precision: resuming a %s checkpoint as %s", state.get("mode"), self.mode)
        self.skipped_steps = int(state.get("skipped_steps", 0))

    def fp32_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """``model``'s state dict with every weight in fp32, O2 weights taken from their masters.

        For exporting a trained student (``save_pretrained(dir, state_dict=...)`` on an
        fp32 copy of the config): under O2 the fp16 model weights are a rounded copy.
        """
        master_of = self._master_of()
        out = {}
        for name, value in model.state_dict(keep_vars=True).items():
            value = master_of.get(id(value), value)
            value = value.detach()
            out[name] = value.float() if value.is_floating_point() else value.clone()
        return out

    def _master_of(self) -> dict[int, torch.Tensor]:
        """id(model parameter) -> the fp32 tensor that holds its exact value, where that is not itself."""
        return {}

    def export_model(self, model: nn.Module) -> nn.Module:
        """A model with fp32 weights for ``save_pretrained``: ``model`` itself when it already holds fp32
        weights, else an fp32 copy (O2: the master weights; O3: the fp16 weights widened)."""
        floating = [t for t in model.state_dict().values() if t.is_floating_point()]
        if all(t.dtype == torch.float32 for t in floating):
            return model
        state = self.fp32_state_dict(model)
        export = copy.deepcopy(model).float()
        export.load_state_dict(state)
        return export


def clip_value(max_grad_norm: float | None) -> float:
    """The total-norm bound for ``clip_grad_norm_``: inf (measure only) for None or <= 0."""
    return float(max_grad_norm) if max_grad_norm and max_grad_norm > 0 else float("inf")


def _backend_class(backend: str) -> type[Precision]:
    return next(c for (b, _), c in MODES.items() if b == backend)
