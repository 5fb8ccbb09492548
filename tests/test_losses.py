"""Each loss against a plain float64 reference (loops over positions), plus the invariants the docs promise."""

import math

import pytest
import torch

from distill.objective import losses

B, S, V, H, HEADS = 3, 7, 11, 6, 2


# ---------------------------------------------------------------------------------------------
# inputs


def make_mask(seed=0):
    """[B, S] with trailing padding and one hole in the middle (masks need not be contiguous)."""
    mask = torch.ones(B, S, dtype=torch.long)
    mask[1, 5:] = 0
    mask[2, 3:] = 0
    mask[0, 2] = 0
    return mask


def randn(*shape, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale


def attention_probs(seed, mask):
    """[B, heads, S, S] probabilities as transformers returns them: padded keys get exactly 0."""
    scores = randn(B, HEADS, S, S, seed=seed, scale=2.0)
    scores = scores.masked_fill(mask[:, None, None, :] == 0, float("-inf"))
    return scores.softmax(-1)


def kept(mask):
    return [(b, s) for b in range(mask.shape[0]) for s in range(mask.shape[1]) if mask[b, s]]


# ---------------------------------------------------------------------------------------------
# float64 references, written out per position


def ref_softmax(z):
    z = z.double()
    e = torch.exp(z - z.max())
    return e / e.sum()


def ref_soft_ce(zs, zt, T, mask):
    rows = [-(ref_softmax(zt[b, s] / T) * torch.log(ref_softmax(zs[b, s] / T))).sum() for b, s in kept(mask)]
    return float(sum(rows) / len(rows)) * T * T


def ref_kl(zs, zt, T, mask):
    rows = []
    for b, s in kept(mask):
        pt, ps = ref_softmax(zt[b, s] / T), ref_softmax(zs[b, s] / T)
        rows.append((pt * (torch.log(pt) - torch.log(ps))).sum())
    return float(sum(rows) / len(rows)) * T * T


def ref_entropy(zt, T, mask):
    rows = [-(ref_softmax(zt[b, s] / T) * torch.log(ref_softmax(zt[b, s] / T))).sum() for b, s in kept(mask)]
    return float(sum(rows) / len(rows))


def ref_mlm(z, labels):
    rows = []
    for b in range(labels.shape[0]):
        for s in range(labels.shape[1]):
            if labels[b, s] != -100:
                rows.append(-torch.log(ref_softmax(z[b, s])[labels[b, s]]))
    return float(sum(rows) / len(rows))


def ref_mse(xs, xt, mask):
    total, count = 0.0, 0
    for b, s in kept(mask):
        for h in range(xs.shape[-1]):
            total += (float(xs[b, s, h]) - float(xt[b, s, h])) ** 2
            count += 1
    return total / count


def ref_cos(xs, xt, mask):
    rows = []
    for b, s in kept(mask):
        u, v = xs[b, s].double(), xt[b, s].double()
        rows.append(1 - float(u @ v) / math.sqrt(float(u @ u) * float(v @ v)))
    return sum(rows) / len(rows)


def ref_att_mse(a_s, a_t, mask):
    total, count = 0.0, 0
    for b in range(B):
        for h in range(HEADS):
            for i in range(S):
                for j in range(S):
                    if mask[b, i] and mask[b, j]:
                        total += (float(a_s[b, h, i, j]) - float(a_t[b, h, i, j])) ** 2
                        count += 1
    return total / count


def ref_att_kl(a_s, a_t, mask):
    rows = []
    for b in range(B):
        for h in range(HEADS):
            for i in range(S):
                if not mask[b, i]:
                    continue
                kl = 0.0
                for j in range(S):
                    if mask[b, j]:
                        pt, ps = float(a_t[b, h, i, j]), float(a_s[b, h, i, j])
                        kl += pt * (math.log(pt) - math.log(ps))
                rows.append(kl)
    return sum(rows) / len(rows)


def ref_value_relation_kl(vs, vt, mask):
    rows = []
    for b in range(B):
        idx = [s for s in range(S) if mask[b, s]]
        for h in range(HEADS):
            xs, xt = vs[b, h, idx].double(), vt[b, h, idx].double()
            rs = torch.einsum("id,jd->ij", xs, xs) / math.sqrt(xs.shape[-1])
            rt = torch.einsum("id,jd->ij", xt, xt) / math.sqrt(xt.shape[-1])
            for i in range(len(idx)):
                ps, pt = ref_softmax(rs[i]), ref_softmax(rt[i])
                rows.append(float((pt * (torch.log(pt) - torch.log(ps))).sum()))
    return sum(rows) / len(rows)


def ref_sigmoid(x):
    return 1 / (1 + math.exp(-x))


def ref_rtd(z, y, mask):
    rows = []
    for b, s in kept(mask):
        q = ref_sigmoid(float(z[b, s]))
        rows.append(-(float(y[b, s]) * math.log(q) + (1 - float(y[b, s])) * math.log(1 - q)))
    return sum(rows) / len(rows)


def ref_rtd_kl(zs, zt, T, mask):
    rows = []
    for b, s in kept(mask):
        qt, qs = ref_sigmoid(float(zt[b, s]) / T), ref_sigmoid(float(zs[b, s]) / T)
        rows.append(qt * math.log(qt / qs) + (1 - qt) * math.log((1 - qt) / (1 - qs)))
    return sum(rows) / len(rows) * T * T


def close(value, reference, rel=1e-6):
    assert value.dtype == torch.float32, value.dtype
    assert float(value) == pytest.approx(reference, rel=rel, abs=1e-9)


# ---------------------------------------------------------------------------------------------
# every function against its reference


@pytest.mark.parametrize("T", [1.0, 2.0, 3.5])
def test_soft_targets_match_reference(T):
    mask = make_mask()
    zs, zt = randn(B, S, V, seed=1, scale=3), randn(B, S, V, seed=2, scale=3)
    close(losses.soft_cross_entropy(zs, zt, T, mask), ref_soft_ce(zs, zt, T, mask))
    close(losses.kl_divergence(zs, zt, T, mask), ref_kl(zs, zt, T, mask))


def test_soft_targets_on_gathered_rows_equal_masked_full_tensor():
    """[N, V] rows in mask.nonzero() order with mask=None (what extract returns) give the same value."""
    mask = make_mask()
    zs, zt = randn(B, S, V, seed=1), randn(B, S, V, seed=2)
    keep = mask.bool()
    for fn in (losses.soft_cross_entropy, losses.kl_divergence):
        assert torch.allclose(fn(zs[keep], zt[keep], 2.0), fn(zs, zt, 2.0, mask), rtol=1e-6)


def test_mlm_loss_matches_reference_full_and_gathered():
    z = randn(B, S, V, seed=3, scale=2)
    labels = torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(4))
    labels[:, ::2] = -100
    close(losses.mlm_loss(z, labels), ref_mlm(z, labels))
    keep = labels != -100
    close(losses.mlm_loss(z[keep], labels[keep]), ref_mlm(z, labels))


def _with_autograd(fn, zs, *args):
    """fn's value and its float64 autograd gradient w.r.t. zs: the reference for the *_grad functions."""
    z = zs.detach().double().requires_grad_(True)
    value = fn(z, *[a.double() if torch.is_tensor(a) and a.is_floating_point() else a for a in args])
    value.backward()
    return value.detach(), z.grad


def _grad_cases():
    N = 9
    zs, zt = randn(N, V, seed=11, scale=3), randn(N, V, seed=12, scale=3)
    labels = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(13))
    some = labels.clone()
    some[::3] = -100
    none = torch.full_like(labels, -100)
    T = 2.5
    return [
        ("ce", losses.soft_cross_entropy, lambda z, **k: losses.soft_cross_entropy_grad(z, zt, T, **k), (zt, T)),
        ("ce_T1", losses.soft_cross_entropy, lambda z, **k: losses.soft_cross_entropy_grad(z, zt, 1.0, **k), (zt, 1.0)),
        ("kl", losses.kl_divergence, lambda z, **k: losses.kl_divergence_grad(z, zt, T, **k), (zt, T)),
        ("kl_T1", losses.kl_divergence, lambda z, **k: losses.kl_divergence_grad(z, zt, 1.0, **k), (zt, 1.0)),
        ("mlm_all", losses.mlm_loss, lambda z, **k: losses.mlm_loss_grad(z, labels, **k), (labels,)),
        ("mlm_some", losses.mlm_loss, lambda z, **k: losses.mlm_loss_grad(z, some, **k), (some,)),
        ("mlm_none", losses.mlm_loss, lambda z, **k: losses.mlm_loss_grad(z, none, **k), (none,)),
        ("out_mse", losses.logits_mse, lambda z, **k: losses.logits_mse_grad(z, zt, **k), (zt,)),
    ], zs


@pytest.mark.parametrize("case", range(8))
def test_grad_functions_give_the_value_and_autograd_s_gradient(case):
    """Each *_grad against autograd of its loss in float64: the value, scale * gradient, and out + that."""
    cases, zs = _grad_cases()
    name, fn, with_grad, args = cases[case]
    ref_value, ref_grad = _with_autograd(fn, zs, *args)
    for z in (zs, zs.double()):  # float32 and float64 inputs: the value and gradient in that precision
        value, grad = with_grad(z, scale=0.75)
        assert grad.dtype == z.dtype and grad.shape == z.shape
        tol = dict(rtol=1e-5, atol=1e-6) if z.dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(value.double(), ref_value, **tol, msg=name)
        torch.testing.assert_close(grad.double(), 0.75 * ref_grad, **tol, msg=name)
    out = randn(*zs.shape, seed=14).double()
    start = out.clone()
    _, total = with_grad(zs.double(), scale=torch.tensor(2.0, dtype=torch.float64), out=out)  # a 0-dim tensor scale
    assert total is out  # accumulated in place
    torch.testing.assert_close(total, start + 2.0 * ref_grad, rtol=1e-10, atol=1e-12, msg=name)
    assert torch.equal(zs, _grad_cases()[1])  # the input is not written


def test_grad_functions_on_no_rows_give_zero():
    empty = torch.zeros(0, V)
    for value, grad in (losses.soft_cross_entropy_grad(empty, empty, 2.0), losses.kl_divergence_grad(empty, empty, 2.0),
                        losses.mlm_loss_grad(empty, torch.zeros(0, dtype=torch.long)),
                        losses.logits_mse_grad(empty, empty)):
        assert float(value) == 0 and grad.shape == (0, V)
    out = torch.zeros(0, V)
    assert losses.soft_cross_entropy_grad(empty, empty, 2.0, out=out)[1] is out


def test_grad_functions_accumulate_across_dtypes_as_the_chunked_head_mixes_them():
    """A float32 (or bf16) student beside a float64 teacher: ce's gradient comes out float64, and mlm over some
    rows adds its own into it; the sum is autograd's in float64. Half-precision logits are computed in float32."""
    N = 6
    zs, zt = randn(N, V, seed=21, scale=2), randn(N, V, seed=22, scale=2).double()
    labels = torch.tensor([3, -100, 5, -100, -100, 1])
    value, out = losses.soft_cross_entropy_grad(zs, zt, 2.0, scale=0.5)
    assert out.dtype == torch.float64
    mlm_value, total = losses.mlm_loss_grad(zs, labels, scale=0.25, out=out)
    assert total is out
    z = zs.double().requires_grad_(True)
    reference = 0.5 * losses.soft_cross_entropy(z, zt, 2.0) + 0.25 * losses.mlm_loss(z, labels)
    reference.backward()
    assert float(0.5 * value + 0.25 * mlm_value) == pytest.approx(float(reference.detach()), rel=1e-6)
    torch.testing.assert_close(total, z.grad, rtol=1e-5, atol=1e-7)
    for dtype in (torch.bfloat16, torch.float16):
        v, g = losses.soft_cross_entropy_grad(zs.to(dtype), zt.float(), 2.0)
        assert v.dtype == g.dtype == torch.float32
        assert float(v) == pytest.approx(float(losses.soft_cross_entropy(zs.to(dtype), zt.float(), 2.0)), rel=1e-6)


def test_values_are_summed_pairwise_not_by_one_float32_dot():
    """Over a vocabulary-sized chunk the value keeps float32's precision (a single dot was off by about 1e-4)."""
    zs, zt = randn(256, 30522, seed=23, scale=3), randn(256, 30522, seed=24, scale=3)
    # At T = 1 the log-probabilities are large and one float32 dot is off by 6e-5 here. Summed
    # pairwise the error is what float32's element-wise exp/log leave, which depends on the CPU's
    # kernels: 4e-7 with AVX-512, 1.2e-6 with AVX2 only. The bound sits between, 12x below one dot.
    for fn, ref in ((lambda: losses.soft_cross_entropy_grad(zs, zt, 1.0)[0],
                     lambda: losses.soft_cross_entropy(zs.double(), zt.double(), 1.0)),
                    (lambda: losses.logits_mse_grad(zs, zt)[0], lambda: losses.logits_mse(zs.double(), zt.double()))):
        assert float(fn()) == pytest.approx(float(ref()), rel=5e-6)


def test_hard_cross_entropy_classification_and_regression():
    z = randn(5, 3, seed=5, scale=2)
    labels = torch.tensor([0, 2, 1, -100, 2])
    rows = [-math.log(float(ref_softmax(z[i])[labels[i]])) for i in range(5) if labels[i] != -100]
    close(losses.hard_cross_entropy(z, labels), sum(rows) / len(rows))

    pred, target = randn(5, 1, seed=6), randn(5, seed=7)
    expected = sum((float(pred[i, 0]) - float(target[i])) ** 2 for i in range(5)) / 5
    close(losses.hard_cross_entropy(pred, target), expected)


def test_hidden_terms_match_reference():
    mask = make_mask()
    hs, ht = randn(B, S, H, seed=8), randn(B, S, H, seed=9)
    close(losses.hidden_mse(hs, ht, mask), ref_mse(hs, ht, mask))
    close(losses.cosine_loss(hs, ht, mask), ref_cos(hs, ht, mask))
    close(losses.logits_mse(hs, ht, mask), ref_mse(hs, ht, mask))


def test_attention_terms_match_reference():
    mask = make_mask()
    a_s, a_t = attention_probs(10, mask), attention_probs(11, mask)
    close(losses.attention_mse(a_s, a_t, mask), ref_att_mse(a_s, a_t, mask))
    close(losses.attention_kl(a_s, a_t, mask), ref_att_kl(a_s, a_t, mask))


def test_value_relation_kl_matches_reference_with_different_head_dims():
    mask = make_mask()
    vs, vt = randn(B, HEADS, S, 3, seed=12), randn(B, HEADS, S, 5, seed=13)
    close(losses.value_relation_kl(vs, vt, mask), ref_value_relation_kl(vs, vt, mask))


def test_value_relation_kl_needs_equal_head_count():
    with pytest.raises(ValueError, match="heads"):
        losses.value_relation_kl(randn(B, 2, S, 4), randn(B, 3, S, 4), make_mask())


@pytest.mark.parametrize("T", [1.0, 2.0])
def test_rtd_terms_match_reference(T):
    mask = make_mask()
    zs, zt = randn(B, S, seed=14, scale=2), randn(B, S, seed=15, scale=2)
    y = (randn(B, S, seed=16) > 0).long()
    close(losses.rtd_loss(zs, y, mask), ref_rtd(zs, y, mask))
    close(losses.rtd_kl(zs, zt, T, mask), ref_rtd_kl(zs, zt, T, mask))
    close(losses.logits_mse(zs, zt, mask), sum((float(zs[p]) - float(zt[p])) ** 2 for p in kept(mask)) / len(kept(mask)))


# ---------------------------------------------------------------------------------------------
# invariants


def test_every_distance_is_zero_for_identical_inputs():
    mask = make_mask()
    z, h = randn(B, S, V, seed=20, scale=3), randn(B, S, H, seed=21)
    a, v, r = attention_probs(22, mask), randn(B, HEADS, S, 4, seed=23), randn(B, S, seed=24)
    zero = {
        "kl": losses.kl_divergence(z, z, 2.0, mask),
        "logits_mse": losses.logits_mse(z, z, mask),
        "hidden_mse": losses.hidden_mse(h, h, mask),
        "cos": losses.cosine_loss(h, h, mask),
        "att_mse": losses.attention_mse(a, a, mask),
        "att_kl": losses.attention_kl(a, a, mask),
        "val_kl": losses.value_relation_kl(v, v, mask),
        "rtd_kl": losses.rtd_kl(r, r, 2.0, mask),
    }
    for name, value in zero.items():
        assert abs(float(value)) < 1e-6, (name, float(value))
    # ce does not vanish: it is the teacher's tempered entropy (times T^2).
    ce = losses.soft_cross_entropy(z, z, 2.0, mask)
    assert float(ce) == pytest.approx(4.0 * ref_entropy(z, 2.0, mask), rel=1e-6)


@pytest.mark.parametrize("T", [0.5, 1.0, 2.0, 4.0])
def test_ce_minus_kl_is_teacher_tempered_entropy_times_T2(T):
    mask = make_mask()
    zs, zt = randn(B, S, V, seed=30, scale=3), randn(B, S, V, seed=31, scale=3)
    diff = losses.soft_cross_entropy(zs, zt, T, mask) - losses.kl_divergence(zs, zt, T, mask)
    assert float(diff) == pytest.approx(T * T * ref_entropy(zt, T, mask), rel=1e-5)


@pytest.mark.parametrize("T", [0.5, 2.0, 4.0])
def test_soft_terms_are_T2_times_the_untempered_loss_of_scaled_logits(T):
    """loss(z, T) == T^2 * loss(z / T, 1): the T^2 factor is applied exactly once."""
    mask = make_mask()
    zs, zt = randn(B, S, V, seed=32, scale=3), randn(B, S, V, seed=33, scale=3)
    rs, rt = randn(B, S, seed=34, scale=3), randn(B, S, seed=35, scale=3)
    for fn, a, b in (
        (losses.soft_cross_entropy, zs, zt),
        (losses.kl_divergence, zs, zt),
        (losses.rtd_kl, rs, rt),
    ):
        tempered = fn(a, b, T, mask)
        assert float(tempered) == pytest.approx(T * T * float(fn(a / T, b / T, 1.0, mask)), rel=1e-5), fn.__name__
    assert float(losses.rtd_kl(rs, rt, T, mask)) == pytest.approx(ref_rtd_kl(rs, rt, T, mask), rel=1e-6)


def _all_terms(mask, z_s, z_t, h_s, h_t, a_s, a_t, v_s, v_t, r_s, r_t, labels):
    return {
        "ce": losses.soft_cross_entropy(z_s, z_t, 2.0, mask),
        "kl": losses.kl_divergence(z_s, z_t, 2.0, mask),
        "out_mse": losses.logits_mse(z_s, z_t, mask),
        "cos": losses.cosine_loss(h_s, h_t, mask),
        "hid_mse": losses.hidden_mse(h_s, h_t, mask),
        "att_mse": losses.attention_mse(a_s, a_t, mask),
        "att_kl": losses.attention_kl(a_s, a_t, mask),
        "val_kl": losses.value_relation_kl(v_s, v_t, mask),
        "rtd": losses.rtd_loss(r_s, labels, mask),
        "rtd_kl": losses.rtd_kl(r_s, r_t, 2.0, mask),
    }


@pytest.mark.parametrize("garbage", [float("nan"), float("inf"), -float("inf"), 1e30])
def test_padding_content_changes_no_loss_and_no_gradient(garbage):
    mask = make_mask()
    pad = mask == 0
    clean = dict(
        z_s=randn(B, S, V, seed=40), z_t=randn(B, S, V, seed=41), h_s=randn(B, S, H, seed=42),
        h_t=randn(B, S, H, seed=43), a_s=attention_probs(44, mask), a_t=attention_probs(45, mask),
        v_s=randn(B, HEADS, S, 4, seed=46), v_t=randn(B, HEADS, S, 3, seed=47), r_s=randn(B, S, seed=48),
        r_t=randn(B, S, seed=49),
    )
    # Garbage at padded positions; for attention at padded query rows AND padded key columns.
    pad_att = (pad[:, None, :, None] | pad[:, None, None, :]).expand(B, HEADS, S, S)
    dirty = {}
    for key, x in clean.items():
        where = pad_att if key.startswith("a_") else pad[:, None, :, None].expand_as(x) if key.startswith("v_") else (
            pad.reshape(B, S, *([1] * (x.dim() - 2))).expand_as(x))
        dirty[key] = x.masked_fill(where, garbage)
    labels = (randn(B, S, seed=50) > 0).long()
    dirty_inputs = {k: v.clone().requires_grad_(True) for k, v in dirty.items()}
    want = _all_terms(mask, **clean, labels=labels)
    got = _all_terms(mask, **dirty_inputs, labels=labels)
    for name in want:
        assert torch.isfinite(got[name]), name
        assert got[name].item() == pytest.approx(float(want[name]), rel=1e-6, abs=1e-9), name
    sum(got.values()).backward()
    for key, x in dirty_inputs.items():
        assert torch.isfinite(x.grad).all(), f"non-finite gradient reaches {key}"


def test_a_batch_without_padding_takes_its_own_path_to_the_padded_path_s_values_and_gradients():
    # A packed batch (every position real) skips the gathers and masks. Appending one all-padding example must
    # change nothing: the padded path then gives the value and the gradients of the same real positions.
    full = torch.ones(B, S, dtype=torch.long)
    padded = torch.cat([full, torch.zeros(1, S, dtype=torch.long)])
    inputs = dict(
        z_s=randn(B, S, V, seed=60), z_t=randn(B, S, V, seed=61), h_s=randn(B, S, H, seed=62),
        h_t=randn(B, S, H, seed=63), a_s=attention_probs(64, full), a_t=attention_probs(65, full),
        v_s=randn(B, HEADS, S, 4, seed=66), v_t=randn(B, HEADS, S, 3, seed=67), r_s=randn(B, S, seed=68),
        r_t=randn(B, S, seed=69),
    )
    labels = (randn(B, S, seed=70) > 0).long()
    junk = {k: torch.full((1, *x.shape[1:]), 0.25) for k, x in inputs.items()}
    packed = {k: x.double().requires_grad_(True) for k, x in inputs.items()}
    longer = {k: x.double().requires_grad_(True) for k, x in inputs.items()}
    want = _all_terms(padded, **{k: torch.cat([longer[k], junk[k].double()]) for k in inputs},
                      labels=torch.cat([labels, labels[:1]]))
    got = _all_terms(full, **packed, labels=labels)
    for name in want:
        assert got[name].item() == pytest.approx(want[name].item(), rel=1e-12, abs=1e-15), name
    sum(want.values()).backward()
    sum(got.values()).backward()
    for key in inputs:
        assert torch.allclose(packed[key].grad, longer[key].grad, rtol=1e-10, atol=1e-14), key
    # relation_kl (MiniLMv2) and mlm_loss: the same check
    xs, xt = randn(B, S, 8, seed=71).double().requires_grad_(True), randn(B, S, 12, seed=72).double()
    xs2 = xs.detach().clone().requires_grad_(True)
    a = losses.relation_kl(xs, xt, full, 4)
    b = losses.relation_kl(torch.cat([xs2, torch.zeros(1, S, 8, dtype=xs.dtype)]),
                           torch.cat([xt, torch.zeros(1, S, 12, dtype=xt.dtype)]), padded, 4)
    assert a.item() == pytest.approx(b.item(), rel=1e-12)
    a.backward()
    b.backward()
    assert torch.allclose(xs.grad, xs2.grad, rtol=1e-10, atol=1e-14)
    z = randn(B, S, V, seed=73).double()
    targets = torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(74))
    with_ignored = torch.cat([z, torch.zeros(1, S, V, dtype=z.dtype)])
    assert losses.mlm_loss(z, targets).item() == pytest.approx(
        losses.mlm_loss(with_ignored, torch.cat([targets, torch.full((1, S), -100)])).item(), rel=1e-12)


def test_mlm_ignores_unlabelled_positions_even_if_garbage():
    z = randn(B, S, V, seed=51)
    labels = torch.full((B, S), -100)
    labels[0, 1], labels[2, 0] = 3, 7
    dirty = z.clone()
    dirty[labels == -100] = float("nan")
    dirty.requires_grad_(True)
    loss = losses.mlm_loss(dirty, labels)
    assert loss.item() == pytest.approx(float(losses.mlm_loss(z, labels)), rel=1e-7)
    loss.backward()
    assert torch.isfinite(dirty.grad).all()


def test_no_kept_position_gives_zero_not_nan():
    """A batch without a single masked target must not turn the step into NaN."""
    z = randn(B, S, V, seed=52)
    empty = torch.zeros(B, S, dtype=torch.long)
    assert float(losses.soft_cross_entropy(z, z + 1, 2.0, empty)) == 0.0
    assert float(losses.attention_kl(attention_probs(53, empty + 1), attention_probs(54, empty + 1), empty)) == 0.0
    assert float(losses.mlm_loss(z, torch.full((B, S), -100))) == 0.0
    assert float(losses.rtd_loss(z[..., 0], torch.zeros(B, S), empty)) == 0.0


@pytest.mark.parametrize("dtype,rel", [(torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
def test_half_precision_inputs_are_computed_in_float32(dtype, rel):
    mask = make_mask()
    zs, zt = randn(B, S, V, seed=60, scale=3), randn(B, S, V, seed=61, scale=3)
    hs, ht = randn(B, S, H, seed=62), randn(B, S, H, seed=63)
    a_s, a_t = attention_probs(64, mask), attention_probs(65, mask)
    vs, vt = randn(B, HEADS, S, 4, seed=66), randn(B, HEADS, S, 4, seed=67)
    cases = [
        (losses.soft_cross_entropy, (zs, zt, 2.0, mask)),
        (losses.kl_divergence, (zs, zt, 2.0, mask)),
        (losses.hidden_mse, (hs, ht, mask)),
        (losses.cosine_loss, (hs, ht, mask)),
        (losses.attention_mse, (a_s, a_t, mask)),
        (losses.attention_kl, (a_s, a_t, mask)),
        (losses.value_relation_kl, (vs, vt, mask)),
        (losses.rtd_kl, (zs[..., 0], zt[..., 0], 2.0, mask)),
    ]
    for fn, args in cases:
        half = [a.to(dtype) if torch.is_tensor(a) and a.is_floating_point() else a for a in args]
        rounded = [a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in half]
        got = fn(*half)
        assert got.dtype == torch.float32, fn.__name__
        # Exactly the float32 computation on the rounded inputs: nothing ran in half precision...
        assert float(got) == pytest.approx(float(fn(*rounded)), rel=1e-6, abs=1e-9), fn.__name__
        # ...so the value is the float32 one up to the inputs' own rounding.
        assert float(got) == pytest.approx(float(fn(*args)), rel=rel, abs=rel * 1e-2), fn.__name__


def test_autocast_does_not_lower_the_precision_of_losses():
    mask = make_mask()
    vs, vt = randn(B, HEADS, S, 4, seed=70, scale=3), randn(B, HEADS, S, 4, seed=71, scale=3)
    hs, ht = randn(B, S, H, seed=72), randn(B, S, H, seed=73)
    want = (losses.value_relation_kl(vs, vt, mask), losses.cosine_loss(hs, ht, mask))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = (losses.value_relation_kl(vs, vt, mask), losses.cosine_loss(hs, ht, mask))
    for w, g in zip(want, got):
        assert g.dtype == torch.float32
        assert float(g) == pytest.approx(float(w), rel=1e-6)


def test_float64_inputs_stay_float64_so_gradcheck_works():
    mask = make_mask()
    vs = randn(B, HEADS, S, 3, seed=80).double().requires_grad_(True)
    vt = randn(B, HEADS, S, 4, seed=81).double()
    assert losses.value_relation_kl(vs, vt, mask).dtype == torch.float64
    assert torch.autograd.gradcheck(lambda x: losses.value_relation_kl(x, vt, mask), (vs,), fast_mode=True)
    zs = randn(B, S, V, seed=82).double().requires_grad_(True)
    zt = randn(B, S, V, seed=83).double()
    assert torch.autograd.gradcheck(lambda x: losses.kl_divergence(x, zt, 2.0, mask), (zs,), fast_mode=True)


# a head, two of three heads (a slice that does not divide the heads), whole batch items (a CPU's slices), the
# maps at once (an accelerator's one slice)
@pytest.mark.parametrize("slice_entries", [1, 2 * S * S, 1 << 16, None])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("teacher_dtype", [torch.bfloat16, torch.float32])  # float32: --teacher_fp32
def test_attention_mse_gradient_is_the_float64_ones_for_half_maps(monkeypatch, slice_entries, packed, teacher_dtype):
    """Slice by slice or whole, the value and both gradients of bf16 maps (against a bf16 or an fp32 teacher) are
    the float64 formula's on the same (rounded) maps, each gradient in its map's dtype, garbage in the padding
    changing nothing; autograd keeps no float32 copy of a map."""
    monkeypatch.setattr(losses, "_slice_entries", lambda device: slice_entries)
    heads = 3
    mask = torch.ones(B, S, dtype=torch.long) if packed else make_mask()
    valid = (mask[:, None, :, None] & mask[:, None, None, :]).bool()

    def maps(seed, dtype):
        scores = randn(B, heads, S, S, seed=seed, scale=2.0).masked_fill(mask[:, None, None, :] == 0, float("-inf"))
        return scores.softmax(-1).masked_fill(~valid, float("nan")).to(dtype).requires_grad_(True)

    a_s, a_t = maps(90, torch.bfloat16), maps(91, teacher_dtype)
    saved = []

    def pack(x):
        saved.append((x.dtype, x.shape, x is a_s or x is a_t))
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        got = losses.attention_mse(a_s, a_t, mask)
    got.backward()
    assert not [x for x in saved if x[0] == torch.float32 and x[1] == a_s.shape and not x[2]], saved
    d_s, d_t = (torch.where(valid, x.detach().double(), 0.0).requires_grad_(True) for x in (a_s, a_t))
    want = torch.where(valid, d_s - d_t, 0.0).pow(2).sum() / (int(valid.sum()) * heads)
    want.backward()
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-6)
    for grad, ref, dtype in ((a_s.grad, d_s.grad, torch.bfloat16), (a_t.grad, d_t.grad, teacher_dtype)):
        assert grad.dtype == dtype and torch.isfinite(grad).all()
        torch.testing.assert_close(grad.double(), ref, rtol=8e-3, atol=1e-9)  # bf16's rounding of the result
    torch.testing.assert_close(a_t.grad.double(), -a_s.grad.double(), rtol=8e-3, atol=1e-9)


def test_attention_mse_float64_gradcheck_and_edges():
    mask = make_mask()
    d, e = randn(B, HEADS, S, S, seed=92).double().requires_grad_(True), randn(B, HEADS, S, S, seed=93).double()
    assert torch.autograd.gradcheck(lambda x: losses.attention_mse(x, e, mask), (d,), fast_mode=True)
    # no second derivative, said in one line instead of a silently first-order answer
    with pytest.raises(RuntimeError, match="no second derivative"):
        torch.autograd.grad(losses.attention_mse(d, e, mask), d, create_graph=True)
    # empty maps: 0, not a division by zero
    empty = torch.zeros(B, HEADS, 0, 0, requires_grad=True)
    assert float(losses.attention_mse(empty, empty.detach(), torch.zeros(B, 0, dtype=torch.long))) == 0.0


def test_bad_arguments_are_clear_errors():
    mask = make_mask()
    z = randn(B, S, V)
    with pytest.raises(ValueError, match="temperature"):
        losses.kl_divergence(z, z, 0.0, mask)
    with pytest.raises(ValueError, match="shape"):
        losses.kl_divergence(z, z[..., :5], 1.0, mask)
    with pytest.raises(ValueError, match="mask shape"):
        losses.hidden_mse(z, z, mask[:, :3])
