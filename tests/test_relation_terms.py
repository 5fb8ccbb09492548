"""MiniLMv2's relation terms (qq_rel, kk_rel, vv_rel) through the objective and distill-train.

The reference takes each layer's input from ``output_hidden_states`` and applies the
layer's own query/key/value Linear to it, then the float64 relation loop of
tests/test_relations.py: extraction, layer pairing and the loss are all checked at once.
"""

import json

import pytest
import torch

from distill.common.errors import UsageError
from distill.models.loading import extract
from distill.objective.plan import Objective
from tests import tiny
from tests.test_relations import reference

RELATIONS = {"qq_rel": 1.0, "kk_rel": 1.0, "vv_rel": 1.0}
PROJECTIONS = {"qq_rel": "query", "kk_rel": "key", "vv_rel": "value"}


@pytest.fixture(scope="module")
def models():
    # a 3-layer teacher 32 wide with 4 heads, a 2-layer student 16 wide with 2 heads: no common head count
    teacher = tiny.build_model("bert_mlm", seed=1, num_hidden_layers=3).eval()
    student = tiny.build_model("bert_mlm", seed=2, num_hidden_layers=2, hidden_size=16, num_attention_heads=2,
                               intermediate_size=32).eval()
    return student, teacher


def projection_output(model, ids, mask, layer: int, name: str) -> torch.Tensor:
    """``layer``'s (1-based) query/key/value Linear applied to that layer's input, computed here."""
    with torch.no_grad():
        hidden = model.bert(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        return getattr(model.bert.encoder.layer[layer - 1].attention.self, name)(hidden[layer - 1])


@pytest.mark.parametrize("teacher_layer", [None, 2])
def test_each_relation_term_equals_a_float64_loop_over_the_layers_own_projections(models, teacher_layer):
    student, teacher = models
    ids, mask = tiny.random_batch(batch=3, seq=10)
    objective = Objective.from_config(RELATIONS, student_config=student, teacher_config=teacher,
                                      relation_heads=4, relation_teacher_layer=teacher_layer)
    batch = {"input_ids": ids, "attention_mask": mask}
    with torch.no_grad():
        s = extract(student, ids, mask, **objective.extract_kwargs(batch, "student"))
        t = extract(teacher, ids, mask, **objective.extract_kwargs(batch, "teacher"))
        total, terms = objective(s, t, batch)
    t_layer = teacher_layer or 3
    for key, name in PROJECTIONS.items():
        expected = reference(projection_output(student, ids, mask, 2, name),
                             projection_output(teacher, ids, mask, t_layer, name), mask, heads=4)
        assert terms[key].item() == pytest.approx(expected, rel=1e-4, abs=1e-6), key
        assert objective.layer_pairs[key] == ((2, t_layer),)
    assert total.item() == pytest.approx(sum(t.item() for t in terms.values()), rel=1e-6)


def test_relation_terms_ask_only_for_the_projections_they_compare(models):
    student, teacher = models
    objective = Objective.from_config({"qq_rel": 1.0, "vv_rel": 2.0}, student_config=student,
                                      teacher_config=teacher, relation_heads=2, relation_teacher_layer=2)
    requests = objective.requests()
    assert requests["student"].qkv == ((2, "query"), (2, "value"))
    assert requests["teacher"].qkv == ((2, "query"), (2, "value"))
    # no hidden states, no attention maps (so no eager attention), no vocabulary head
    for request in requests.values():
        assert not request.hidden and not request.attentions and request.logits is None
    assert not objective.needs_attention
    assert objective.to_dict()["relation_heads"] == 2 and objective.to_dict()["relation_teacher_layer"] == 2


def test_relation_heads_that_do_not_divide_a_width_and_a_bad_teacher_layer_are_one_line_errors(models):
    student, teacher = models
    with pytest.raises(UsageError, match=r"relation_heads=3 does not divide") as err:
        Objective.from_config(RELATIONS, student_config=student, teacher_config=teacher, relation_heads=3)
    assert "\n" not in str(err.value)
    with pytest.raises(UsageError, match=r"relation_teacher_layer 4 is out of range: the teacher has 3 layers"):
        Objective.from_config(RELATIONS, student_config=student, teacher_config=teacher, relation_heads=4,
                              relation_teacher_layer=4)


def test_relation_terms_do_not_exist_at_sequence_level(models):
    student, teacher = models
    with pytest.raises(UsageError, match="does not exist at sequence level"):
        Objective.from_config({"qq_rel": 1.0}, student_config=student, teacher_config=teacher, relation_heads=4,
                              sequence_level=True)


def test_distill_train_runs_minilmv2_relations_into_a_narrower_student(bert_mlm_dir, vocab_dir, tmp_path):
    """A 16-wide student of a 32-wide teacher (MiniLMv2's setting: built with its own width, not copied)."""
    from distill.cli import train_main

    student = tiny.save_model("bert_mlm", tmp_path / "student", vocab_dir, seed=3, num_hidden_layers=2,
                              hidden_size=16, num_attention_heads=2, intermediate_size=32)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(" ".join(tiny.WORDS[(i * 7 + j) % len(tiny.WORDS)] for j in range(40))
                                for i in range(40)) + "\n")
    out = tmp_path / "run"
    values = dict(teacher=bert_mlm_dir, student=student, student_layers=[2, 4], corpus=str(corpus),
                  output_dir=str(out), cache_dir=str(tmp_path / "cache"), weights=RELATIONS, relation_heads=4,
                  relation_teacher_layer=3, block_size=16, per_device_batch_size=4, learning_rate=1e-3,
                  max_steps=8, precision="fp32", save_steps=0, logging_steps=1, progress=False, device="cpu")
    assert train_main(tiny.cli_args(values)) == 0
    log = [json.loads(line) for line in (out / "logs" / "train_log.jsonl").read_text().splitlines()]
    assert all(key in log[-1] for key in RELATIONS)
    first, last = (sum(r[k] for k in RELATIONS) for r in (log[0], log[-1]))
    assert last < first, (first, last)
    recorded = json.loads((out / "distill_config.json").read_text())
    assert recorded["relation_heads"] == 4 and recorded["relation_teacher_layer"] == 3
