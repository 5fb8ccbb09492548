"""The sentence-embedding terms (sent_mse, sent_cos): token states pooled as the teacher's sentence-transformers
pipeline pools them, checked against float64 references written out here, against sentence-transformers' own
Pooling and Normalize modules, and through the objective with a width projection."""

import json
import math
from pathlib import Path

import pytest
import torch

from distill.common.errors import UsageError
from distill.models.sentence import POOLING_MODES, sentence_pooling
from distill.objective import losses
from distill.objective.plan import Objective
from distill.objective.terms import TERMS
from distill.models.loading import extract
from tests import tiny


def _states(seed=0, batch=3, seq=7, width=6, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(batch, seq, width, generator=g, dtype=dtype)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[1, 4:] = 0
    mask[2, 2:] = 0
    return h, mask


def _reference_pool(h, mask, modes, normalize):
    """Row by row, in float64, with Python loops over the real tokens only."""
    out = []
    for b in range(h.shape[0]):
        real = [i for i in range(h.shape[1]) if mask[b, i]]
        tokens = [h[b, i].double() for i in real]
        parts = []
        for mode in modes:
            if mode == "cls":
                parts.append(tokens[0])
            elif mode == "lasttoken":
                parts.append(tokens[-1])
            elif mode == "max":
                parts.append(torch.stack(tokens).max(0).values)
            elif mode == "mean":
                parts.append(sum(tokens) / len(tokens))
            elif mode == "mean_sqrt_len_tokens":
                parts.append(sum(tokens) / math.sqrt(len(tokens)))
        v = torch.cat(parts)
        out.append(v / v.norm() if normalize else v)
    return torch.stack(out)


@pytest.mark.parametrize("modes", [("mean",), ("cls",), ("max",), ("mean_sqrt_len_tokens",), ("lasttoken",),
                                   ("cls", "mean")])
@pytest.mark.parametrize("normalize", [False, True])
def test_pooling_matches_a_float64_reference_and_ignores_padding(modes, normalize):
    h, mask = _states()
    expected = _reference_pool(h, mask, modes, normalize)
    torch.testing.assert_close(losses.pool_sentence(h.double(), mask, modes, normalize), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(losses.pool_sentence(h, mask, modes, normalize).double(), expected, rtol=1e-5, atol=1e-6)
    garbage = h.clone()
    garbage[mask == 0] = float("nan")
    garbage[2, 5, 0] = float("inf")
    torch.testing.assert_close(losses.pool_sentence(garbage, mask, modes, normalize),
                               losses.pool_sentence(h, mask, modes, normalize))


@pytest.mark.parametrize("mode", ["mean", "cls", "max", "mean_sqrt_len_tokens", "lasttoken"])
def test_pooling_is_sentence_transformers_own(mode):
    from sentence_transformers.models import Normalize, Pooling

    h, mask = _states(width=8)
    pool, norm = Pooling(8, pooling_mode=mode), Normalize()
    features = norm(pool({"token_embeddings": h, "attention_mask": mask}))
    torch.testing.assert_close(losses.pool_sentence(h, mask, (mode,), normalize=True), features["sentence_embedding"],
                               rtol=1e-6, atol=1e-6)


def test_sentence_mse_and_cosine_against_float64_references():
    hs, mask = _states(seed=1)
    ht, _ = _states(seed=2)
    for modes, normalize in ((("mean",), True), (("cls",), False), (("max", "mean"), False)):
        es, et = _reference_pool(hs, mask, modes, normalize), _reference_pool(ht, mask, modes, normalize)
        mse = ((es - et) ** 2).mean()
        cos = (1 - (es * et).sum(1) / (es.norm(dim=1) * et.norm(dim=1))).mean()
        assert abs(losses.sentence_mse(hs, ht, mask, modes, normalize).item() - mse.item()) < 1e-6 * max(1, mse.item())
        assert abs(losses.sentence_cosine(hs, ht, mask, modes, normalize).item() - cos.item()) < 1e-6
    assert losses.sentence_mse(hs, hs, mask).item() == 0
    assert losses.sentence_cosine(hs, hs * 3, mask).item() < 1e-6  # a cosine ignores scale


def test_the_gradient_reaches_real_tokens_only():
    hs, mask = _states(seed=3)
    ht, _ = _states(seed=4)
    hs.requires_grad_(True)
    losses.sentence_mse(hs, ht, mask, ("mean",), True).backward()
    assert hs.grad[mask == 0].abs().max() == 0 and hs.grad[mask == 1].abs().max() > 0


def test_the_model_side_and_the_loss_side_know_the_same_pooling_modes():
    assert POOLING_MODES == losses.SENTENCE_POOLING_MODES


def _sentence_folder(folder: Path, pooling: dict, extra_modules=()) -> str:
    """A tiny BERT with a sentence-transformers pipeline: Transformer -> Pooling(pooling) -> modules."""
    folder.mkdir()
    tiny.save_model("bert_base", folder, tiny.save_tokenizer(folder))
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    modules += [{"idx": i + 2, "name": str(i + 2), "path": f"{i + 2}_{kind}", "type": f"sentence_transformers.models.{kind}"}
                for i, kind in enumerate(extra_modules)]
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 32, **pooling}))
    return str(folder)


def test_the_pooling_is_read_from_the_pipeline_in_either_layout(tmp_path):
    legacy = _sentence_folder(tmp_path / "a", {"pooling_mode_mean_tokens": True, "pooling_mode_cls_token": True},
                              ["Normalize"])
    assert sentence_pooling(legacy) == {"modes": ["cls", "mean"], "normalize": True}  # sentence-transformers' order
    new = _sentence_folder(tmp_path / "b", {"pooling_mode": "lasttoken"})
    assert sentence_pooling(new) == {"modes": ["lasttoken"], "normalize": False}
    assert sentence_pooling(tiny.save_model("bert_base", tmp_path / "plain")) is None and sentence_pooling("") is None
    dense = _sentence_folder(tmp_path / "c", {"pooling_mode": "mean"}, ["Dense", "Normalize"])
    with pytest.raises(UsageError, match=r"modules \['Transformer', 'Pooling', 'Dense', 'Normalize'\].*hid_mse"):
        sentence_pooling(dense)
    weighted = _sentence_folder(tmp_path / "d", {"pooling_mode": "weightedmean"})
    with pytest.raises(UsageError, match="pools with 'weightedmean'"):
        sentence_pooling(weighted)


def test_sent_mse_through_the_objective_pools_the_projected_student_as_the_teacher_pools(tmp_path):
    """A 16-wide student against a 32-wide CLS-pooled, normalised teacher: the objective's value is
    mean((normalize(cls(W h_s + b)) - normalize(cls(h_t)))^2), recomputed here in float64."""
    from distill.models.loading import load_model

    teacher_dir = _sentence_folder(tmp_path / "t", {"pooling_mode_cls_token": True}, ["Normalize"])
    teacher = load_model(teacher_dir).eval()
    student = tiny.build_model("bert_base", seed=1, hidden_size=16, num_attention_heads=2, intermediate_size=32,
                               num_hidden_layers=2).eval()
    objective = Objective.from_config({"sent_mse": 1.0, "sent_cos": 1.0}, student_config=student,
                                      teacher_config=teacher.config, student_layers=[2, 4], projection=True)
    assert objective.to_dict()["sentence_pooling"] == {"modes": ["cls"], "normalize": True}
    ids, mask = tiny.random_batch(batch=3, seq=10, pad_last=4)
    batch = {"input_ids": ids, "attention_mask": mask}
    with torch.no_grad():
        t = extract(teacher, ids, mask, **objective.extract_kwargs(batch, "teacher"))
        s = extract(student, ids, mask, **objective.extract_kwargs(batch, "student"))
        total, terms = objective(s, t, batch)
    w, b = (p.double() for p in (objective.projections["sent_mse"].weight, objective.projections["sent_mse"].bias))
    es = s.hidden_states[-1][:, 0].double() @ w.T + b
    et = t.hidden_states[-1][:, 0].double()
    es, et = es / es.norm(dim=1, keepdim=True), et / et.norm(dim=1, keepdim=True)
    assert abs(terms["sent_mse"].item() - ((es - et) ** 2).mean().item()) < 1e-7
    w2, b2 = (p.double() for p in (objective.projections["sent_cos"].weight, objective.projections["sent_cos"].bias))
    ec = s.hidden_states[-1][:, 0].double() @ w2.T + b2
    cos = (ec * et).sum(1) / ec.norm(dim=1)
    assert abs(terms["sent_cos"].item() - (1 - cos).mean().item()) < 1e-6
    assert abs(total.item() - terms["sent_mse"].item() - terms["sent_cos"].item()) < 1e-6


def test_a_plain_teacher_is_mean_pooled_and_the_registry_says_what_the_terms_are():
    config = tiny.make_config("bert_base")
    objective = Objective.from_config({"sent_mse": 1.0}, student_config=config, teacher_config=config,
                                      student_layers=[1, 2, 3, 4])
    assert objective.to_dict()["sentence_pooling"] == {"modes": ["mean"], "normalize": False}
    for key in ("sent_mse", "sent_cos"):
        spec = TERMS[key]
        assert spec.pooled and spec.projects and spec.layers == "last" and not spec.sequence_level
    with pytest.raises(UsageError, match="'sent_mse' does not exist at sequence level"):
        Objective.from_config({"sent_mse": 1.0}, student_config=config, teacher_config=config, sequence_level=True)
