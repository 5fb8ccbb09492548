"""MiniLMv2 relations: relation_kl against a float64 loop written here, and capture_qkv against the layers' own
query/key/value projections applied to the layer input."""

import math

import pytest
import torch
from transformers import AutoModel

from distill.models.qkv import capture_qkv
from distill.objective.losses import check_relation_heads, relation_kl
from tests import tiny

B, S = 3, 7


def make_mask():
    """[B, S]: one full row, trailing padding, and a hole in the middle."""
    mask = torch.ones(B, S, dtype=torch.long)
    mask[1, 4:] = 0
    mask[2, 2] = 0
    mask[2, 6] = 0
    return mask


def randn(*shape, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale


def reference(student, teacher, mask, heads):
    """KL(R_t || R_s) row by row in float64: R = softmax over real keys of x_r x_r^T / sqrt(d)."""
    rows = []
    for b in range(student.shape[0]):
        real = [j for j in range(student.shape[1]) if mask[b, j]]
        for r in range(heads):
            def relation(x, i):
                d = x.shape[-1] // heads
                head = x[b, :, r * d:(r + 1) * d].double()
                scores = [float(head[i] @ head[j]) / math.sqrt(d) for j in real]
                top = max(scores)
                z = sum(math.exp(s - top) for s in scores)
                return [math.exp(s - top) / z for s in scores]

            for i in real:
                p_t, p_s = relation(teacher, i), relation(student, i)
                rows.append(sum(t * math.log(t / s) for t, s in zip(p_t, p_s)))
    return sum(rows) / len(rows)


# ---------------------------------------------------------------------------------------------
# relation_kl


@pytest.mark.parametrize("w_s,w_t,heads", [(12, 24, 4), (12, 24, 12), (8, 6, 2), (6, 6, 1), (20, 30, 5)])
def test_matches_a_float64_loop_with_different_widths_and_padding(w_s, w_t, heads):
    mask = make_mask()
    student, teacher = randn(B, S, w_s, seed=1, scale=1.5), randn(B, S, w_t, seed=2, scale=1.5)
    got = relation_kl(student, teacher, mask, heads)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(reference(student, teacher, mask, heads), rel=1e-5)
    got64 = relation_kl(student.double(), teacher.double(), mask, heads)
    assert got64.item() == pytest.approx(reference(student, teacher, mask, heads), rel=1e-12)


def test_a_hand_computed_value():
    # one head, d = 1: student rows (1, 0) give relation rows [e, 1] / (e + 1) and [1/2, 1/2];
    # the teacher's zero vectors give uniform rows.
    student = torch.tensor([[[1.0], [0.0]]])
    teacher = torch.zeros(1, 2, 1)
    e = math.e
    first = 0.5 * math.log(0.5 / (e / (e + 1))) + 0.5 * math.log(0.5 / (1 / (e + 1)))
    assert relation_kl(student, teacher, None, 1).item() == pytest.approx(first / 2, rel=1e-6)


def test_no_mask_means_every_position_is_real():
    student, teacher = randn(B, S, 8, seed=3), randn(B, S, 16, seed=4)
    full = torch.ones(B, S, dtype=torch.long)
    assert relation_kl(student, teacher, None, 4).item() == pytest.approx(reference(student, teacher, full, 4),
                                                                           rel=1e-5)


def test_zero_when_the_relations_agree_though_the_widths_differ():
    # teacher head r = c * [h_r, h_r]: its dot products are 2c^2 times the student's and its d is twice the
    # student's, so with c = 2^(-1/4) its scaled scores x x^T / sqrt(d) equal the student's exactly
    student = randn(B, S, 8, seed=5)
    heads = student.reshape(B, S, 4, 2)
    teacher = torch.cat([heads, heads], dim=-1).reshape(B, S, 16) / math.sqrt(2) * 2 ** 0.25
    assert relation_kl(student, teacher, make_mask(), 4).item() == pytest.approx(0.0, abs=1e-6)
    assert relation_kl(student, randn(B, S, 16, seed=6), make_mask(), 4).item() > 1e-3


def test_padding_content_changes_neither_value_nor_gradient():
    mask = make_mask()
    student, teacher = randn(B, S, 12, seed=7), randn(B, S, 24, seed=8)
    junk_s, junk_t = student.clone(), teacher.clone()
    pad = mask == 0
    junk_s[pad] = float("nan")
    junk_t[pad] = float("inf")
    a = student.clone().requires_grad_(True)
    b = junk_s.clone().requires_grad_(True)
    clean, dirty = relation_kl(a, teacher, mask, 4), relation_kl(b, junk_t, mask, 4)
    assert dirty.item() == pytest.approx(clean.item(), rel=1e-6)
    clean.backward()
    dirty.backward()
    assert torch.isfinite(b.grad).all()
    assert torch.equal(b.grad[pad], torch.zeros_like(b.grad[pad]))
    assert torch.allclose(a.grad, b.grad, atol=1e-7)


def test_gradient_is_finite_and_matches_finite_differences():
    mask = make_mask()
    student = randn(B, S, 6, seed=9).double().requires_grad_(True)
    teacher = randn(B, S, 9, seed=10).double()
    assert torch.autograd.gradcheck(lambda x: relation_kl(x, teacher, mask, 3), (student,))


@pytest.mark.parametrize("padded", [True, False])
def test_gradients_of_both_sides_match_finite_differences_with_and_without_padding(padded):
    # the loss takes its gradients in the forward pass (losses._RelationKL): the student's and, when it asks
    # for one, the teacher's, on the padded path and the no-padding path (which masks nothing)
    mask = make_mask() if padded else None
    student = randn(B, S, 8, seed=17).double().requires_grad_(True)
    teacher = randn(B, S, 12, seed=18, scale=1.3).double().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda s, t: relation_kl(s, t, mask, 4), (student, teacher))


def test_a_retained_graph_backpropagates_twice_to_the_same_gradient():
    student = randn(B, S, 8, seed=19).requires_grad_(True)
    value = relation_kl(student, randn(B, S, 8, seed=20), make_mask(), 2) * 3.0
    first = torch.autograd.grad(value, student, retain_graph=True)[0]
    second = torch.autograd.grad(value, student)[0]
    assert torch.equal(first, second) and first.abs().sum() > 0


def test_the_gradients_taken_in_the_forward_are_freed_by_the_backward_and_no_grad_gives_the_value_alone():
    student = randn(B, S, 8, seed=21).requires_grad_(True)
    teacher = randn(B, S, 8, seed=22)
    value = relation_kl(student, teacher, make_mask(), 2)
    value.backward()
    with pytest.raises(RuntimeError, match="freed"):  # nothing of the size of the input kept past the backward
        value.grad_fn.saved_tensors
    with torch.no_grad():
        quiet = relation_kl(student, teacher, make_mask(), 2)
    assert quiet.grad_fn is None and quiet.item() == pytest.approx(value.item(), rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_give_finite_values_and_gradients(dtype):
    mask = make_mask()
    # scale 60: x x^T reaches ~60^2 * 16 = 57,600 per head, near fp16's 65,504 limit before the 1/sqrt(d):
    # computed in fp16 the scores (or a -1e9 mask value) would overflow
    student = randn(B, S, 64, seed=11, scale=60.0).to(dtype).requires_grad_(True)
    teacher = randn(B, S, 128, seed=12, scale=60.0).to(dtype)
    value = relation_kl(student, teacher, mask, 4)
    assert value.dtype == torch.float32 and torch.isfinite(value)
    # the same rounded inputs in float32 give the same value: nothing was computed in half precision
    assert value.item() == pytest.approx(relation_kl(student.float(), teacher.float(), mask, 4).item(), rel=1e-5)
    value.backward()
    assert student.grad.dtype == dtype and torch.isfinite(student.grad.float()).all()


def test_under_autocast_the_loss_still_runs_in_float32():
    mask = make_mask()
    student, teacher = randn(B, S, 12, seed=13), randn(B, S, 24, seed=14)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = relation_kl(student, teacher, mask, 4)
    assert value.item() == pytest.approx(reference(student, teacher, mask, 4), rel=1e-5)


def test_an_all_padding_batch_is_zero_not_nan():
    x = randn(2, 4, 8, seed=15).requires_grad_(True)
    value = relation_kl(x, randn(2, 4, 8, seed=16), torch.zeros(2, 4, dtype=torch.long), 2)
    value.backward()
    assert value.item() == 0.0 and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("heads,needle", [(5, "relation_heads=5 does not divide the student width 12"),
                                          (8, "relation_heads=8 does not divide the student width 12: choose"),
                                          (0, "relation_heads=0 must be a whole number >= 1"),
                                          (2.0, "relation_heads=2.0 must be a whole number")])
def test_a_count_that_does_not_divide_a_width_is_refused(heads, needle):
    with pytest.raises(ValueError, match=needle.replace("(", r"\(")) as err:
        relation_kl(randn(B, S, 12), randn(B, S, 24), make_mask(), heads)
    if heads == 5:
        assert str(err.value).endswith("e.g. 2, 3, 4, 6")  # the divisors of both widths nearest to 5


def test_mismatched_batch_or_sequence_is_refused():
    with pytest.raises(ValueError, match=r"equal batch and seq"):
        relation_kl(randn(B, S, 12), randn(B, S + 1, 12), None, 4)


def test_check_relation_heads_names_the_side():
    check_relation_heads(12, student=384, teacher=768)
    with pytest.raises(ValueError, match="relation_heads=7 does not divide the student width 384, teacher width 768"):
        check_relation_heads(7, student=384, teacher=768)


# ---------------------------------------------------------------------------------------------
# capture_qkv


def _projections(model, kind, index):
    if kind == "bert_base":
        attn = model.encoder.layer[index].attention.self
        return {"query": attn.query, "key": attn.key, "value": attn.value}
    attn = model.transformer.layer[index].attention
    return {"query": attn.q_lin, "key": attn.k_lin, "value": attn.v_lin}


@pytest.fixture(scope="module", params=["bert_base", "distilbert_base"])
def saved(request, tmp_path_factory):
    kind = request.param
    folder = tmp_path_factory.mktemp(kind)
    if kind == "distilbert_base":
        from transformers import DistilBertModel

        torch.manual_seed(0)
        DistilBertModel(tiny.make_config("distilbert")).save_pretrained(str(folder))
        return "distilbert", str(folder)
    return kind, tiny.save_model(kind, folder)


@pytest.mark.parametrize("train_mode", [False, True])
def test_capture_equals_the_layers_own_projections_of_its_input(saved, train_mode):
    kind, folder = saved
    model = AutoModel.from_pretrained(folder)
    model.train(train_mode)
    ids, mask = tiny.random_batch(batch=3, seq=10)
    forwards = []
    layer_index = 2
    layer = (model.encoder.layer if kind == "bert_base" else model.transformer.layer)[layer_index]
    counter = layer.register_forward_hook(lambda *_: forwards.append(1))
    modules = _projections(model, kind, layer_index)
    torch.manual_seed(0)
    with capture_qkv(modules) as qkv:
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    counter.remove()
    assert len(forwards) == 1  # the model's own forward, nothing more
    layer_input = out.hidden_states[layer_index]  # hidden_states[i] is what layer i (0-based) received
    for name, linear in modules.items():
        with torch.no_grad():
            expected = torch.nn.functional.linear(layer_input, linear.weight, linear.bias)
        assert qkv[name].shape == (3, 10, 32)
        assert torch.allclose(qkv[name], expected, atol=1e-6), name
        assert qkv[name].requires_grad  # attached: a relation term's gradient reaches the student
    for module in modules.values():
        assert not module._forward_hooks  # removed on exit


def test_captured_vectors_feed_relation_kl_between_different_widths(saved, tmp_path):
    kind, folder = saved
    student = AutoModel.from_pretrained(folder).eval()
    teacher_cfg = tiny.make_config("bert", hidden_size=48, num_attention_heads=3)
    torch.manual_seed(1)
    from transformers import BertModel

    teacher = BertModel(teacher_cfg).eval()
    ids, mask = tiny.random_batch(batch=2, seq=9)
    with capture_qkv(_projections(student, kind, -1)) as s_qkv:
        student(input_ids=ids, attention_mask=mask)
    with torch.no_grad(), capture_qkv(_projections(teacher, "bert_base", -1)) as t_qkv:
        teacher(input_ids=ids, attention_mask=mask)
    loss = sum(relation_kl(s_qkv[k], t_qkv[k], mask, 4) for k in ("query", "key", "value"))
    loss.backward()
    grad = _projections(student, kind, -1)["query"].weight.grad
    assert torch.isfinite(loss) and grad is not None and grad.abs().sum() > 0


def test_hooks_are_removed_even_when_the_forward_fails(saved):
    kind, folder = saved
    model = AutoModel.from_pretrained(folder)
    modules = _projections(model, kind, 0)
    with pytest.raises(RuntimeError):
        with capture_qkv(modules):
            raise RuntimeError("boom")
    assert all(not m._forward_hooks for m in modules.values())


def test_a_module_that_is_not_a_projection_is_named():
    block = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="'query' produced \\(2, 4\\), not \\[batch, seq, width\\]"):
        with capture_qkv({"query": block}):
            block(torch.randn(2, 4))
