"""Mixed precision: apex's opt levels with native torch, checked on tiny CPU tensors (semantics, not speed).

The fp16 O2 master weights (distill/train/precision/masters.py) have their own file: test_precision_o2.py.

fp16 on a CPU is refused by default (it crawls); these tests pass ``allow_cpu_fp16=True``
to check O1/O2 semantics. The same tests run on CUDA where a GPU is present.
"""

import copy
import logging
import sys
import types

import pytest
import torch
from torch import nn

from distill.common.errors import UsageError
from distill.train.precision import (
    MODES,
    ApexAmp,
    Bf16,
    Fp16O1,
    Fp16O2,
    Fp16O3,
    Fp32,
    Precision,
    StepResult,
    is_norm,
    read_cpu_flags,
    resolve_precision,
)
from tests import tiny

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def make(precision="fp16", level="O2", device="cpu", **kw):
    kw.setdefault("allow_cpu_fp16", True)
    return Precision.from_config(precision, level, device=device, **kw)


def tiny_bert(device="cpu", seed=0):
    return tiny.build_model("bert_mlm", seed=seed).to(device).eval()  # eval: no dropout, comparable runs


def mlm_loss(model, device="cpu", seed=0):
    ids, mask = tiny.random_batch(seed=seed)
    ids, mask = ids.to(device), mask.to(device)
    return model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss


def masters(opt):
    return [p for group in opt.param_groups for p in group["params"]]


# ---------------------------------------------------------------- what O2 relies on (its masters: test_precision_o2.py)
def test_layernorm_with_fp32_weights_takes_fp16_input_under_autocast():
    # What O2 relies on: fp16 activations meet fp32 norm weights. On CUDA autocast runs layer_norm in
    # fp32 (fp32 output); on CPU it runs in fp16. Either way it must work and give fp32 weight grads.
    for device in DEVICES:
        ln = nn.LayerNorm(16).to(device)
        x = torch.randn(4, 16, device=device).half().requires_grad_()
        with torch.autocast(device, dtype=torch.float16):
            y = ln(x)
        assert y.dtype in (torch.float16, torch.float32)
        torch.testing.assert_close(y.float(), ln(x.float()), atol=5e-3, rtol=5e-3)
        y.float().pow(2).sum().backward()
        assert ln.weight.grad.dtype == torch.float32 and torch.isfinite(ln.weight.grad).all()


def test_is_norm_covers_layernorm_and_friends():
    class T5LayerNorm(nn.Module):
        pass

    assert all(is_norm(m) for m in (nn.LayerNorm(4), nn.GroupNorm(2, 4), nn.BatchNorm1d(4), T5LayerNorm()))
    assert not any(is_norm(m) for m in (nn.Linear(4, 4), nn.Embedding(4, 4)))


# ---------------------------------------------------------------- dynamic loss scaling
@pytest.mark.parametrize("level", ["O1", "O2"])
@pytest.mark.parametrize("overflow", ["inf_grad", "huge_loss"])
def test_overflow_skips_the_step_halves_the_scale_and_is_counted(level, overflow):
    model = tiny_bert()
    prec = make(level=level)
    prec.prepare(model)
    opt = prec.make_optimizer(model.parameters(), torch.optim.AdamW, lr=1e-3)
    with prec.autocast():
        loss = mlm_loss(model)
    prec.backward(loss)
    assert not prec.step(opt, 1.0).skipped
    before_model = [p.detach().clone() for p in model.parameters()]
    before_opt = [p.detach().clone() for p in masters(opt)]
    scale = prec.loss_scale

    with prec.autocast():
        loss = mlm_loss(model, seed=1)
    if overflow == "huge_loss":
        loss = loss * 1e30
    prec.backward(loss)
    if overflow == "inf_grad":
        model.bert.encoder.layer[0].attention.self.query.weight.grad[0, 0] = float("inf")
    result = prec.step(opt, 1.0)

    assert result.skipped and not torch.isfinite(torch.tensor(result.grad_norm))
    assert result.scale == prec.loss_scale == scale / 2
    assert prec.skipped_steps == 1
    assert all(torch.equal(a, b) for a, b in zip(before_model, model.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(before_opt, masters(opt)))
    assert all(s["step"] == 1 for s in opt.state.values())  # the optimiser did not step
    assert all(p.grad is None for p in list(model.parameters()) + masters(opt))

    with prec.autocast():
        loss = mlm_loss(model, seed=2)
    prec.backward(loss)
    assert not prec.step(opt, 1.0).skipped and prec.skipped_steps == 1  # training goes on


def test_clean_steps_keep_the_scale_and_it_doubles_after_the_growth_interval():
    model = tiny_bert()
    prec = make(growth_interval=3, init_scale=2.0**10)
    prec.prepare(model)
    opt = prec.make_optimizer(model.parameters(), torch.optim.AdamW, lr=1e-3)
    scales = []
    for step in range(4):
        with prec.autocast():
            loss = mlm_loss(model, seed=step)
        prec.backward(loss)
        scales.append(prec.step(opt, 1.0).scale)
    assert scales == [2.0**10, 2.0**10, 2.0**11, 2.0**11]
    assert prec.skipped_steps == 0


def test_gradient_accumulation_keeps_one_scale_across_micro_batches():
    model, ref = tiny_bert(), tiny_bert()
    prec = make(growth_interval=1)  # would grow at every update: accumulation must not trigger one
    prec.prepare(model)
    opt = prec.make_optimizer(model.parameters(), torch.optim.AdamW, lr=1e-3)
    scale = prec.loss_scale
    for micro in range(3):
        with prec.autocast():
            loss = mlm_loss(model, seed=micro) / 3
        prec.backward(loss)
        (mlm_loss(ref, seed=micro) / 3).backward()
        assert prec.loss_scale == scale
    for p, r in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad.float() / scale, r.grad, atol=2e-3, rtol=2e-2)
    result = prec.step(opt, 1.0)
    assert not result.skipped and result.scale == 2 * scale  # one update per optimiser step


def test_a_step_with_no_gradients_changes_nothing():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    prec = make()
    prec.prepare(model)
    opt = prec.make_optimizer(model.parameters(), torch.optim.AdamW, lr=1e-3)
    before = [p.detach().clone() for p in model.parameters()]
    assert prec.step(opt, 1.0) == StepResult(skipped=False, grad_norm=0.0, scale=2.0**16)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters())) and not opt.state


# ---------------------------------------------------------------- O1, bf16, O3
def test_o1_autocasts_matmuls_to_fp16_keeps_fp32_weights_and_scales_the_loss():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    ref = copy.deepcopy(model)
    prec = make(level="O1")
    prec.prepare(model)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    opt = prec.make_optimizer(model.parameters(), torch.optim.SGD, lr=1.0)
    assert masters(opt) == list(model.parameters())
    x = torch.randn(5, 8)
    with prec.autocast():
        out = model(x)
    assert out.dtype == torch.float16
    prec.backward(out.float().pow(2).mean())
    ref(x).pow(2).mean().backward()
    scale = prec.loss_scale
    assert scale == 2.0**16 and prec.scales_loss
    for p, r in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad / scale, r.grad, atol=1e-3, rtol=1e-2)  # grads arrive scaled
    before = [p.detach().clone() for p in model.parameters()]
    assert not prec.step(opt, None).skipped
    for p, b, r in zip(model.parameters(), before, ref.parameters()):
        torch.testing.assert_close(b - p.detach(), r.grad, atol=1e-3, rtol=1e-2)  # the step used unscaled grads
    assert "O1" in prec.description


def test_bf16_autocasts_to_bf16_and_never_scales():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    ref = copy.deepcopy(model)
    prec = Precision.from_config("bf16", device="cpu", cpu_flags=frozenset({"avx512_bf16"}))
    assert prec.scaler is None and prec.loss_scale == 1.0 and prec.opt_level is None
    assert prec.prepare(model) is model and all(p.dtype == torch.float32 for p in model.parameters())
    opt = prec.make_optimizer(model.parameters(), torch.optim.SGD, lr=0.1)
    x = torch.randn(5, 8)
    with prec.autocast():
        out = model(x)
    assert out.dtype == torch.bfloat16
    prec.backward(out.float().pow(2).mean())
    ref(x).pow(2).mean().backward()
    for p, r in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, r.grad, atol=2e-2, rtol=5e-2)  # unscaled
    ref_norm = float(torch.linalg.vector_norm(torch.stack([r.grad.norm() for r in ref.parameters()])))
    assert prec.step(opt, 1.0) == StepResult(skipped=False, grad_norm=pytest.approx(ref_norm, rel=2e-2), scale=1.0)


def test_fp32_is_plain_training():
    prec = Precision.from_config("fp32", device="cpu")
    model = nn.Linear(4, 2)
    with prec.autocast():
        assert model(torch.randn(3, 4)).dtype == torch.float32
    assert prec.loss_scale == 1.0 and not prec.scales_loss and prec.description.startswith("fp32")


def test_o3_is_refused_without_force_and_names_the_way_out():
    with pytest.raises(UsageError, match=r"O3.*does not train.*O2.*force_o3=True"):
        make(level="O3")


def test_o3_with_force_runs_pure_fp16_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="distill.train.precision"):
        prec = make(level="O3", force_o3=True)
    assert any("O3 forced" in r.getMessage() for r in caplog.records)
    assert any("O3 forced" in note for note in prec.notes)
    model = prec.prepare(tiny_bert())
    assert all(p.dtype == torch.float16 for p in model.parameters())  # norms too
    opt = prec.make_optimizer(model.parameters(), torch.optim.SGD, lr=1e-3)
    assert masters(opt) == list(model.parameters()) and prec.loss_scale == 1.0
    with prec.autocast():
        loss = mlm_loss(model)
    prec.backward(loss)
    assert not prec.step(opt, 1.0).skipped
    assert "O3" in prec.description


# ---------------------------------------------------------------- fp16 on a CPU, device decisions
@pytest.mark.parametrize(
    "precision, device, flags, allow, want, note",
    [
        ("fp16", "cpu", {"avx2", "avx512_bf16"}, False, "bf16", "75x"),
        ("fp16", "cpu", {"amx_bf16"}, False, "bf16", "bf16 autocast instead"),
        ("fp16", "cpu", {"avx2"}, True, "fp16", "allow_cpu_fp16"),
        ("fp16", "cuda", None, False, "fp16", None),
        ("bf16", "cpu", {"avx512_bf16"}, False, "bf16", None),
        ("bf16", "cpu", {"avx2"}, False, "bf16", "slower than fp32"),
        ("bf16", "cpu", None, False, "bf16", "could not read"),
        ("fp32", "cpu", set(), False, "fp32", None),
    ],
)
def test_resolve_precision_decides_from_the_device_and_cpu_flags(precision, device, flags, allow, want, note):
    got, notes = resolve_precision(precision, device, None if flags is None else frozenset(flags), allow)
    assert got == want
    assert (note is None and notes == []) or any(note in n for n in notes)


@pytest.mark.parametrize("flags, why", [({"avx2", "avx512f"}, "no bf16 instructions"), (None, "could not read")])
def test_fp16_on_a_cpu_without_bf16_stops_with_a_clear_message(flags, why):
    with pytest.raises(UsageError, match=rf"fp16 on a CPU.*75x slower.*{why}.*--precision fp32"):
        resolve_precision("fp16", "cpu", None if flags is None else frozenset(flags))
    if flags is not None:
        with pytest.raises(UsageError, match="75x slower"):
            Precision.from_config("fp16", "O2", device="cpu", cpu_flags=frozenset(flags))


def test_fp16_asked_on_a_bf16_cpu_falls_back_to_bf16_and_says_so(caplog):
    with caplog.at_level(logging.WARNING, logger="distill.train.precision"):
        prec = Precision.from_config("fp16", "O2", device="cpu", cpu_flags=frozenset({"avx512_bf16"}))
    assert prec.precision == "bf16" and prec.scaler is None and prec.opt_level is None
    assert "asked for fp16 O2" in prec.description
    assert any("bf16 autocast instead" in r.getMessage() for r in caplog.records)
    model = prec.prepare(nn.Linear(4, 4))
    assert model.weight.dtype == torch.float32
    with prec.autocast():
        assert model(torch.randn(2, 4)).dtype == torch.bfloat16


def test_read_cpu_flags_reads_x86_and_arm_cpuinfo(tmp_path):
    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512_bf16 amx_bf16\n\nprocessor\t: 1\n")
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd bf16\n")
    assert {"avx512_bf16", "amx_bf16", "avx2"} <= read_cpu_flags(str(x86))
    assert "bf16" in read_cpu_flags(str(arm))
    assert read_cpu_flags(str(tmp_path / "missing")) is None


# ---------------------------------------------------------------- bad config values, apex
@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(precision="fp8"), r"precision 'fp8' is not one of fp32, bf16, fp16"),
        (dict(precision="fp16", fp16_opt_level="O4"), r"fp16_opt_level 'O4' is not one of O1, O2, O3"),
        (dict(precision="fp16", fp16_opt_level="O0"), r"O0 is precision fp32"),
        (dict(precision="fp16", amp_backend="deepspeed"), r"amp_backend 'deepspeed' is not one of native, apex"),
    ],
)
def test_unknown_values_are_refused_naming_the_valid_ones(kwargs, message):
    with pytest.raises(UsageError, match=message):
        Precision.from_config(device="cpu", allow_cpu_fp16=True, **kwargs)


@pytest.mark.parametrize("fake_apex", [None, types.ModuleType("apex")])  # not installed / the unrelated PyPI apex
def test_apex_backend_without_apex_amp_is_refused_clearly(monkeypatch, fake_apex):
    monkeypatch.setitem(sys.modules, "apex", fake_apex)
    monkeypatch.delitem(sys.modules, "apex.amp", raising=False)
    with pytest.raises(UsageError, match=r"apex\.amp.*removed.*2025.*amp_backend native"):
        Precision.from_config("fp16", "O2", device="cuda", amp_backend="apex")


def test_apex_backend_when_apex_amp_exists_goes_through_amp(monkeypatch):
    # A stand-in for legacy NVIDIA apex (cannot be installed here): checks the wiring only.
    calls = []

    class Scaler:
        value = 2.0**16

        def loss_scale(self):
            return self.value

    amp = types.ModuleType("apex.amp")
    amp._amp_state = types.SimpleNamespace(loss_scalers=[Scaler()])

    def initialize(models, optimizer, opt_level, **kw):
        calls.append(("initialize", opt_level))
        optimizer._amp_stash = types.SimpleNamespace(already_patched=False)
        return models, optimizer

    class ScaleLoss:  # as apex: an overflow lowers the scale and patches step() to skip, in the exit
        def __init__(self, loss, optimizer):
            self.loss, self.optimizer = loss, optimizer

        def __enter__(self):
            calls.append("scale_loss")
            return self.loss

        def __exit__(self, *exc):
            if not torch.isfinite(self.loss):
                Scaler.value /= 2
                opt, real_step = self.optimizer, self.optimizer.step

                def skip_step(closure=None):
                    opt.step, opt._amp_stash.already_patched = real_step, False

                opt.step, opt._amp_stash.already_patched = skip_step, True
            return False

    amp.initialize, amp.scale_loss = initialize, ScaleLoss
    amp.master_params = lambda opt: (p for g in opt.param_groups for p in g["params"])
    amp.state_dict, amp.load_state_dict = (lambda: {"loss_scaler0": 1.0}), (lambda d: calls.append("load"))
    apex = types.ModuleType("apex")
    apex.amp = amp
    monkeypatch.setitem(sys.modules, "apex", apex)
    monkeypatch.setitem(sys.modules, "apex.amp", amp)

    with pytest.raises(UsageError, match="CUDA only"):
        Precision.from_config("fp16", "O2", device="cpu", amp_backend="apex")
    prec = Precision.from_config("fp16", "O2", device="cuda", amp_backend="apex")
    assert "apex" in prec.description and prec.scaler is None
    model = prec.prepare(nn.Linear(4, 2))
    opt = prec.make_optimizer(model.parameters(), torch.optim.SGD, lr=0.1)
    with prec.autocast():
        loss = model(torch.randn(3, 4)).pow(2).mean()
    prec.backward(loss)
    result = prec.step(opt, 1.0)
    assert calls == [("initialize", "O2"), "scale_loss"]
    assert not result.skipped and result.scale == 2.0**16 and model.weight.grad is None
    before = model.weight.detach().clone()
    with prec.autocast():  # an overflow: the step is skipped, reported so (the scheduler must not step), scale halved
        loss = model(torch.randn(3, 4)).pow(2).mean() * float("inf")
    prec.backward(loss)
    result = prec.step(opt, 1.0)
    assert result.skipped and result.scale == 2.0**15 and prec.skipped_steps == 1
    assert torch.equal(model.weight, before)
    prec.load_state_dict(prec.state_dict())
    assert calls[-1] == "load"


# ---------------------------------------------------------------- one interface, one class per mode
@pytest.mark.parametrize("precision, level, kwargs, cls", [
    ("fp32", "O2", {}, Fp32),
    ("bf16", "O2", {}, Bf16),
    ("fp16", "O1", {}, Fp16O1),
    ("fp16", "O2", {}, Fp16O2),
    ("fp16", "O3", {"force_o3": True}, Fp16O3),
])
def test_from_config_builds_the_one_class_of_each_mode(precision, level, kwargs, cls):
    prec = Precision.from_config(precision, level, device="cpu", allow_cpu_fp16=True,
                                 cpu_flags=frozenset({"avx512_bf16"}), **kwargs)
    assert type(prec) is cls and isinstance(prec, Precision)
    assert MODES[("native", prec.mode)] is cls and prec.description.startswith(prec.mode)
    # each mode's observable contract, in one table
    dtype = {"fp32": None, "bf16": torch.bfloat16}.get(precision, torch.float16)
    with prec.autocast():
        out = nn.Linear(4, 4)(torch.randn(2, 4))
    assert out.dtype == (dtype or torch.float32)
    assert prec.scales_loss == (prec.mode in ("fp16 O1", "fp16 O2"))
    assert ("masters" in prec.state_dict()) == (prec.mode == "fp16 O2")


def test_every_mode_and_backend_has_exactly_one_class():
    native = {mode for backend, mode in MODES if backend == "native"}
    assert native == {"fp32", "bf16", "fp16 O1", "fp16 O2", "fp16 O3"}
    assert {mode for backend, mode in MODES if backend == "apex"} == {"fp16 O1", "fp16 O2", "fp16 O3"}
    assert all(MODES[("apex", m)] is ApexAmp for m in ("fp16 O1", "fp16 O2", "fp16 O3"))


@pytest.mark.parametrize("mode", ["fp32", "bf16"])
def test_adamw_is_fused_unless_the_caller_chose(mode):
    """make_optimizer builds torch's AdamW fused (one kernel) by default; it takes the same step as the loop."""
    torch.manual_seed(0)
    model = nn.Linear(6, 3)
    grads = [torch.randn_like(p) for p in model.parameters()]
    results = {}
    for flags in ({}, {"fused": False}, {"foreach": False}):
        prec = Precision.from_config(mode, device=torch.device("cpu"))
        m = copy.deepcopy(model)
        opt = prec.make_optimizer(m.parameters(), torch.optim.AdamW, lr=1e-2, **flags)
        assert opt.defaults["fused"] is (True if not flags else None if "foreach" in flags else False)
        for p, g in zip(m.parameters(), grads):
            p.grad = g.clone()
        opt.step()
        results[str(flags)] = [p.detach().clone() for p in m.parameters()]
    for other in ("{'fused': False}", "{'foreach': False}"):  # fused, the loop and the chosen path: one step
        for a, b in zip(results["{}"], results[other]):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    sgd = Precision.from_config(mode, device=torch.device("cpu")).make_optimizer(model.parameters(), torch.optim.SGD, lr=1.0)
    assert "fused" not in sgd.defaults or not sgd.defaults["fused"]
