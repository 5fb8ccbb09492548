"""The vocabulary head chunk by chunk (distill.models.vocab_head): same values and gradients as the whole head,
checked against float64 formulas; no [N, vocab] tensor kept for backward; fp16 gradients in range."""

from __future__ import annotations

import contextlib
import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from distill.common.errors import UsageError
from distill.models.families import FAMILIES, VocabHead
from distill.models.loading import extract, vocab_head
from distill.models.vocab_head import DeferredLogits, chunk_rows, chunked
from distill.objective.plan import Objective
from distill.objective.terms import TERMS, TermSpec, register, unregister
from tests.tiny import build_model

T = 2.0
WEIGHTS = {"ce": 5.0, "mlm": 2.0, "kl": 0.5, "out_mse": 0.1, "cos": 1.0}


@pytest.fixture(scope="module")
def pair():
    teacher = build_model("bert_mlm", seed=1).eval()
    student = build_model("bert_mlm", seed=2, num_hidden_layers=2).eval()
    return student, teacher


def make_batch(vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (3, 14), generator=g)
    mask = torch.ones(3, 14, dtype=torch.long)
    mask[1, 9:] = 0
    mask[2, 12:] = 0
    labels = torch.full((3, 14), -100)
    for b, s in ((0, 2), (0, 7), (1, 3), (2, 5), (2, 11)):
        labels[b, s] = int(torch.randint(5, vocab, (1,), generator=g))
    return {"input_ids": ids, "attention_mask": mask, "mlm_labels": labels}


def run(weights, student, teacher, batch, rows, **kw):
    objective = Objective.from_config(weights, T, student_config=student, teacher_config=teacher,
                                      student_layers=[2, 4], logit_chunk_rows=rows, **kw)
    student = copy.deepcopy(student)
    with torch.no_grad():
        t = extract(teacher, batch["input_ids"], batch["attention_mask"], **objective.extract_kwargs(batch, "teacher"))
    s = extract(student, batch["input_ids"], batch["attention_mask"], **objective.extract_kwargs(batch, "student"))
    total, terms = objective(s, t, batch)
    total.backward()
    grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    return s, total.detach(), terms, grads


def float64_reference(student, teacher, batch):
    """The logit terms written from their formulas, in float64, on the models' own full [B, S, V] logits."""
    student, teacher = copy.deepcopy(student).double(), copy.deepcopy(teacher).double()
    ids, mask = batch["input_ids"], batch["attention_mask"].bool()
    zs = student(input_ids=ids, attention_mask=batch["attention_mask"]).logits[mask]
    with torch.no_grad():
        zt = teacher(input_ids=ids, attention_mask=batch["attention_mask"]).logits[mask]
    labels = batch["mlm_labels"][mask]
    p_t = torch.softmax(zt / T, -1)
    log_p_s = torch.log_softmax(zs / T, -1)
    ce = (-(p_t * log_p_s).sum(-1)).mean() * T * T
    kl = (p_t * (torch.log_softmax(zt / T, -1) - log_p_s)).sum(-1).mean() * T * T
    out_mse = ((zs - zt) ** 2).mean()
    keep = labels != -100
    mlm = -torch.log_softmax(zs[keep], -1).gather(1, labels[keep, None]).mean()
    total = 5 * ce + 2 * mlm + 0.5 * kl + 0.1 * out_mse
    total.backward()
    grad = student.cls.predictions.decoder.weight.grad
    return {"ce": ce, "mlm": mlm, "kl": kl, "out_mse": out_mse}, grad


@pytest.mark.parametrize("rows", [1, 4, 7, 0, 1000])
def test_chunked_terms_and_gradients_match_the_float64_formulas(pair, rows):
    student, teacher = pair
    batch = make_batch(student.config.vocab_size)
    logit_weights = {k: v for k, v in WEIGHTS.items() if k != "cos"}
    s, total, terms, grads = run(logit_weights, student, teacher, batch, rows)
    assert isinstance(s.logits, DeferredLogits)  # the chunked path ran
    reference, ref_grad = float64_reference(student, teacher, batch)
    for name, value in reference.items():
        assert float(terms[name]) == pytest.approx(value.item(), rel=1e-5), name
    assert total.item() == pytest.approx(sum(logit_weights[k] * reference[k] for k in reference).item(), rel=1e-5)
    # the decoder weight is tied to the word embeddings: its gradient holds the head's and the embedding's parts
    decoder_grad = grads["cls.predictions.decoder.weight"] if "cls.predictions.decoder.weight" in grads else \
        grads["bert.embeddings.word_embeddings.weight"]
    torch.testing.assert_close(decoder_grad.double(), ref_grad, rtol=1e-4, atol=1e-6)


def zero_gradient(name: str, grads: dict) -> bool:
    """Whether ``name`` is a key bias, whose true gradient is 0 (softmax ignores a shift of a score row), and
    ``grads`` holds only rounding for it (within 1e-3 of the largest gradient): compared entry by entry, two
    low-precision paths' rounding would differ by 100%."""
    return name.endswith("key.bias") and bool(grads[name].abs().max() < 1e-3 * max(g.abs().max() for g in grads.values()))


@contextlib.contextmanager
def autograd_ce():
    """``auto_ce``: ce registered without its logit_grad, so the chunked head differentiates it by autograd."""
    spec = TERMS["ce"]
    register(dataclasses.replace(spec, key="auto_ce", logit_grad=None))
    try:
        yield
    finally:
        unregister("auto_ce")


def test_terms_without_logit_grad_go_through_autograd_beside_those_with_one(pair):
    """A chunk's gradient from logit_grad terms and an autograd term together: the float64 formulas."""
    student, teacher = pair
    batch = make_batch(student.config.vocab_size, seed=5)
    reference, ref_grad = float64_reference(student, teacher, batch)
    with autograd_ce():
        weights = {"auto_ce": 5.0, "mlm": 2.0, "kl": 0.5, "out_mse": 0.1}
        s, total, terms, grads = run(weights, student, teacher, batch, 4)
    assert isinstance(s.logits, DeferredLogits)  # the chunked head ran (auto_ce is a row mean too)
    assert float(terms["auto_ce"]) == pytest.approx(reference["ce"].item(), rel=1e-5)
    assert total.item() == pytest.approx(sum(WEIGHTS[k] * reference[k] for k in reference).item(), rel=1e-5)
    decoder_grad = grads.get("cls.predictions.decoder.weight", grads.get("bert.embeddings.word_embeddings.weight"))
    torch.testing.assert_close(decoder_grad.double(), ref_grad, rtol=1e-4, atol=1e-6)


def test_chunks_equal_the_whole_head_everywhere_in_the_student(pair):
    """Every parameter's gradient (the body's included), with a representation term beside the logit terms."""
    student, teacher = pair
    batch = make_batch(student.config.vocab_size, seed=3)
    s_whole, total_whole, terms_whole, grads_whole = run(WEIGHTS, student, teacher, batch, -1)
    assert isinstance(s_whole.logits, torch.Tensor)  # -1: the unchunked path
    _, total, terms, grads = run(WEIGHTS, student, teacher, batch, 3)
    assert float(total) == pytest.approx(float(total_whole), rel=1e-6)
    assert list(terms) == list(terms_whole) == list(WEIGHTS)  # the log keeps the configured order
    for name in WEIGHTS:
        assert float(terms[name]) == pytest.approx(float(terms_whole[name]), rel=1e-5, abs=1e-7), name
    assert grads.keys() == grads_whole.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], grads_whole[name], rtol=1e-4, atol=1e-7, msg=name)


def test_no_full_size_logits_are_kept_for_backward(pair):
    """Autograd keeps no [N, vocab] tensor from a chunked head; the whole head keeps several."""
    student, teacher = pair
    batch = make_batch(student.config.vocab_size)
    vocab = student.config.vocab_size
    n = int(batch["attention_mask"].sum())

    def largest_logit_rows(rows, weights=None):
        kept = []

        def pack(x):
            if x.dim() >= 2 and x.shape[-1] == vocab and x.shape[-2] != student.config.hidden_size:
                kept.append(x.shape[-2])
            return x

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            run(weights or {"ce": 5, "mlm": 2}, student, teacher, batch, rows)
        return max(kept, default=0)

    assert largest_logit_rows(-1) == n
    assert largest_logit_rows(4) == 0  # the terms' own gradients (logit_grad): no graph over any chunk's logits
    with autograd_ce():  # a row-mean term without logit_grad: autograd per chunk, a chunk's logits at most
        assert largest_logit_rows(4, {"auto_ce": 5, "mlm": 2}) == 4


@pytest.mark.parametrize("path", ["autograd", "logit_grad"])
def test_fp16_gradients_are_taken_at_the_loss_scale(path):
    """Gradients that underflow fp16 at scale 1 survive when taken at the loop's loss scale, on both ways of taking
    them: autograd of chunk_loss, and a chunk_grad that multiplies by the scale before the cast to fp16."""
    torch.manual_seed(0)
    n, width, vocab = 6, 8, 50
    hidden64 = torch.randn(n, width, dtype=torch.float64)
    weight64 = torch.randn(vocab, width, dtype=torch.float64) * 0.1
    targets = torch.softmax(torch.randn(n, vocab, dtype=torch.float64), -1)
    tiny = 1e-6  # the loss's weight: its gradients are ~1e-9, below fp16's smallest subnormal (6e-8)

    def chunk_loss(rows, logits):
        value = -(targets[rows] * torch.log_softmax(logits.double(), -1)).sum() * tiny / n
        return value, value.detach()[None]

    def chunk_grad(rows, logits, scale):  # d/dz of -sum(q log softmax(z)) * tiny / n = (softmax(z) - q) * tiny / n
        value, parts = chunk_loss(rows, logits)
        grad = (torch.softmax(logits.double(), -1) - targets[rows]) * (tiny / n * scale)
        return value, parts, grad.float()

    h64 = hidden64.clone().requires_grad_()
    chunk_loss(slice(0, n), F.linear(h64, weight64))[0].backward()
    results = {}
    for scale in (1.0, 2.0 ** 16):
        h = hidden64.half().requires_grad_()
        w = weight64.half().requires_grad_()
        total, _ = chunked(chunk_loss, DeferredLogits(h, w, None), 2, scale=scale,
                           chunk_grad=chunk_grad if path == "logit_grad" else None)
        (total * scale).backward()  # what GradScaler.scale(loss).backward() does
        results[scale] = h.grad.double() / scale
    assert results[1.0].abs().max() < h64.grad.abs().max() / 10  # underflowed: (mostly) zeros
    torch.testing.assert_close(results[2.0 ** 16], h64.grad, rtol=2e-2, atol=1e-12)


def test_bf16_autocast_runs_the_decoder_in_bf16_as_the_whole_head(pair):
    student, teacher = pair
    batch = make_batch(student.config.vocab_size)
    out = {}
    for rows in (-1, 5):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            s, total, terms, grads = run({"ce": 5, "mlm": 2}, student, teacher, batch, rows)
        out[rows] = total, grads
        if rows != -1:
            assert s.logits.autocast == ("cpu", torch.bfloat16)
            assert s.logits.rows(slice(0, 2)).dtype == torch.bfloat16
    assert float(out[5][0]) == pytest.approx(float(out[-1][0]), rel=2e-2)
    for name, grad in out[-1][1].items():  # bf16 matmuls on both paths: agreement to bf16's precision
        if zero_gradient(name, out[-1][1]) and zero_gradient(name, out[5][1]):
            continue
        scale = grad.abs().max().clamp(min=1e-12)
        assert (out[5][1][name] - grad).abs().max() / scale < 5e-2, name


def test_chunking_applies_only_when_every_logit_term_is_a_row_mean(pair):
    student, teacher = pair
    batch = make_batch(student.config.vocab_size)
    spec = TERMS["ce"]
    register(TermSpec("whole_ce", "logits", spec.loss, "ce, declared as needing all rows at once",
                      logits_at=spec.logits_at, temperature=True, input=spec.input, student_heads=spec.student_heads,
                      teacher_heads=spec.teacher_heads, softmax_outputs=True))
    try:
        objective = Objective.from_config({"whole_ce": 1, "mlm": 1}, T, student_config=student, teacher_config=teacher)
        assert objective.extract_kwargs(batch, "student")["defer_head"] is False
        s, _, terms, _ = run({"whole_ce": 1, "mlm": 1}, student, teacher, batch, 0)
        assert isinstance(s.logits, torch.Tensor)
        _, _, chunked_terms, _ = run({"ce": 1, "mlm": 1}, student, teacher, batch, 0)
        assert float(terms["whole_ce"]) == pytest.approx(float(chunked_terms["ce"]), rel=1e-6)
    finally:
        unregister("whole_ce")
    with pytest.raises(ValueError, match="row_mean"):
        TermSpec("bad", "hidden", spec.loss, "x", layers="last", row_mean="rows")


def test_chunk_sizes():
    assert chunk_rows(-1, 512, 30522, 768) == 512
    assert chunk_rows(16, 512, 30522, 768) == 16
    auto = chunk_rows(0, 1024, 30522, 768)
    assert 2 ** 22 <= auto * 30522 <= 2 * 2 ** 22 and -(-1024 // auto) * auto - 1024 < 5  # about the budget, equal chunks
    assert chunk_rows(0, 1000, 250002, 768) == 200  # a 250k vocabulary: the floor of width / 4 rows, 5 chunks
    assert chunk_rows(0, 10, 100, 8) == 10  # small heads: one chunk
    with pytest.raises(UsageError, match=r"logit_chunk_rows=-2 is out of range: it must be a finite number in \[-1, inf\)"):
        Objective.from_config({"ce": 1}, T, student_config=build_model("bert_mlm"),
                              teacher_config=build_model("bert_mlm"), logit_chunk_rows=-2)


@pytest.mark.parametrize("kind", ["bert", "distilbert", "roberta", "xlm-roberta", "mpnet", "electra"])
def test_each_family_vocab_head_is_the_models_own_head(kind):
    """decoder(transform(h)) of the registry entry equals the model's own forward logits."""
    from transformers import AutoConfig, AutoModelForMaskedLM

    family = FAMILIES[kind]
    head = family.heads["mlm"]
    assert isinstance(head, VocabHead)
    shape = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, dim=32,
                 n_layers=2, n_heads=4, hidden_dim=48, embedding_size=32, vocab_size=99, max_position_embeddings=40)
    config = AutoConfig.for_model(kind, **shape)
    torch.manual_seed(0)
    model = AutoModelForMaskedLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name.lower() or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    assert vocab_head(model) is head
    ids = torch.randint(5, 99, (2, 9))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
        features = extract(model, ids, mask, positions=mask.bool(), defer_head=True)
    assert isinstance(features.logits, DeferredLogits)
    torch.testing.assert_close(features.logits.materialize(), expected.reshape(-1, 99), rtol=1e-5, atol=1e-5)
    # chunked through this family's own decoder (tied to its embeddings or not): the whole head's gradients
    target = torch.softmax(torch.randn(18, 99), -1)

    def chunk_loss(rows, logits):
        value = -(target[rows] * torch.log_softmax(logits, -1)).sum() / 18
        return value, value.detach()[None]

    grads = {}
    for rows in (None, 5):
        model.zero_grad()
        features = extract(model, ids, mask, positions=mask.bool(), defer_head=True)
        if rows is None:
            chunk_loss(slice(0, 18), features.logits.materialize())[0].backward()
        else:
            chunked(chunk_loss, features.logits, rows)[0].backward()
        grads[rows] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert grads[5].keys() == grads[None].keys()
    for name, grad in grads[None].items():
        torch.testing.assert_close(grads[5][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_a_second_backward_through_a_chunked_head_is_refused_clearly():
    h = torch.randn(4, 3, requires_grad=True)
    w = torch.randn(7, 3, requires_grad=True)

    def chunk_loss(rows, logits):
        value = logits.logsumexp(-1).sum()
        return value, value.detach()[None]

    total, _ = chunked(chunk_loss, DeferredLogits(h, w, None), 2)
    total.backward(retain_graph=True)
    expected = torch.func.grad(lambda x: F.linear(x, w.detach()).logsumexp(-1).sum())(h.detach())
    torch.testing.assert_close(h.grad, expected)
    with pytest.raises(RuntimeError, match="once per forward"):
        total.backward()


def test_fp16_o2_through_precision_matches_the_whole_head():
    """Precision's fp16 O2 loop (GradScaler, fp16 weights): the chunked head's scaled gradients are the whole head's."""
    from distill.train.precision import Precision

    teacher = build_model("bert_mlm", seed=1).eval()
    student0 = build_model("bert_mlm", seed=2, num_hidden_layers=2).eval()
    batch = make_batch(student0.config.vocab_size)
    grads = {}
    for rows in (-1, 4):
        prec = Precision.from_config("fp16", "O2", device=torch.device("cpu"), allow_cpu_fp16=True)
        student = prec.prepare(copy.deepcopy(student0))
        # small weights: at the GradScaler's first scale (2**16) no gradient overflows, and unscaled many
        # would underflow fp16
        objective = Objective.from_config({"ce": 5e-3, "mlm": 2e-3}, T, student_config=student,
                                          teacher_config=teacher, student_layers=[2, 4], logit_chunk_rows=rows)
        prec.make_optimizer(list(student.parameters()), torch.optim.AdamW, lr=1e-3)
        with prec.autocast():
            with torch.no_grad():
                t = extract(teacher, batch["input_ids"], batch["attention_mask"],
                            **objective.extract_kwargs(batch, "teacher"))
            s = extract(student, batch["input_ids"], batch["attention_mask"],
                        **objective.extract_kwargs(batch, "student"))
            total, _ = objective(s, t, batch)
        assert isinstance(s.logits, DeferredLogits) == (rows != -1)
        prec.backward(total)  # scaled by the GradScaler, 2**16 at the start
        grads[rows] = {n: p.grad.float() for n, p in student.named_parameters() if p.grad is not None}
    assert grads[4].keys() == grads[-1].keys()
    for name, grad in grads[-1].items():
        assert torch.isfinite(grad).all() and torch.isfinite(grads[4][name]).all(), name
        if zero_gradient(name, grads[-1]) and zero_gradient(name, grads[4]):
            continue
        torch.testing.assert_close(grads[4][name], grad, rtol=2e-2, atol=2e-2 * float(grad.abs().max()), msg=name)


def test_without_grad_mode_the_values_come_alone():
    torch.manual_seed(0)
    h = torch.randn(5, 3)
    w = torch.nn.Parameter(torch.randn(7, 3))
    taken = []

    def chunk_loss(rows, logits):
        taken.append(logits.requires_grad)
        value = logits.logsumexp(-1).sum()
        return value, value.detach()[None]

    with torch.no_grad():
        total, parts = chunked(chunk_loss, DeferredLogits(h, w, None), 2)
    assert not total.requires_grad and taken == [False, False, False]  # no graph, no gradient work
    assert float(total) == pytest.approx(float(F.linear(h, w.detach()).logsumexp(-1).sum()), rel=1e-6)
    assert float(parts[0]) == pytest.approx(float(total), rel=1e-6)


@pytest.mark.parametrize("frozen", ["weight", "hidden", "bias"])
def test_frozen_pieces_get_no_gradient_and_the_others_the_right_one(frozen):
    torch.manual_seed(0)
    h = torch.randn(5, 3, requires_grad=frozen != "hidden")
    w = torch.randn(7, 3, requires_grad=frozen != "weight")
    b = torch.randn(7, requires_grad=frozen != "bias")
    target = torch.softmax(torch.randn(5, 7), -1)

    def chunk_loss(rows, logits):
        value = -(target[rows] * torch.log_softmax(logits, -1)).sum() / 5
        return value, value.detach()[None]

    total, _ = chunked(chunk_loss, DeferredLogits(h, w, b), 2)
    total.backward()
    ref = [x.detach().clone().requires_grad_(x.requires_grad) for x in (h, w, b)]
    (-(target * torch.log_softmax(F.linear(*ref), -1)).sum() / 5).backward()
    for x, r in zip((h, w, b), ref):
        assert (x.grad is None) == (not x.requires_grad)
        if x.requires_grad:
            torch.testing.assert_close(x.grad, r.grad)
