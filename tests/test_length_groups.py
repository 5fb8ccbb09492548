"""Length groups (distill/models/groups.py, glue-eval --length_groups): the cut is the cheapest one, and the
grouped forward gives the one forward's features, losses and gradients."""

import itertools

import pytest
import torch

from distill.models.groups import extract_in_groups, length_groups, right_padded
from distill.models.loading import extract
from tests.tiny import eager_classifier


def brute_force_cost(lengths, groups):
    """The fewest positions over every cut of the sorted lengths into at most ``groups`` runs."""
    sizes = sorted(lengths)
    best = None
    for k in range(1, min(groups, len(sizes)) + 1):
        for cuts in itertools.combinations(range(1, len(sizes)), k - 1):
            bounds = (0, *cuts, len(sizes))
            cost = sum((b - a) * sizes[b - 1] for a, b in zip(bounds, bounds[1:]))
            best = cost if best is None else min(best, cost)
    return best


@pytest.mark.parametrize("seed", range(6))
def test_the_cut_computes_the_fewest_positions(seed):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 40, (9,), generator=g).tolist()
    for groups in (1, 2, 3, 4):
        runs = length_groups(lengths, groups)
        assert sorted(i for run in runs for i in run) == list(range(len(lengths)))  # every row once
        assert len(runs) <= groups
        cost = sum(len(run) * max(lengths[i] for i in run) for run in runs)
        assert cost == brute_force_cost(lengths, groups)


def test_equal_lengths_stay_one_group():
    assert length_groups([7, 7, 7, 7], 4) == [[0, 1, 2, 3]]


def padded_batch(lengths, seq, vocab=60, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (len(lengths), seq), generator=g)
    mask = (torch.arange(seq)[None, :] < torch.tensor(lengths)[:, None]).long()
    ids[:, 0] = 2
    ids = ids * mask
    types = (torch.arange(seq)[None, :] >= torch.tensor(lengths)[:, None] // 2).long() * mask
    return ids, mask, types


def test_grouped_features_equal_one_forward():
    model = eager_classifier(seed=3, layers=3)
    ids, mask, types = padded_batch([5, 16, 9, 16, 3, 12, 7], seq=16)
    kwargs = dict(token_type_ids=types, hidden=True, attentions=True, value_layers=(2,), qkv=((1, "query"),),
                  sequence_logits=True)
    one = extract(model, ids, mask, **kwargs)
    grouped = extract_in_groups(model, ids, mask, groups=3, **kwargs)
    torch.testing.assert_close(grouped.logits, one.logits, atol=1e-5, rtol=1e-5)
    real = mask.bool()
    for a, b in zip(grouped.hidden_states, one.hidden_states):
        torch.testing.assert_close(a[real], b[real], atol=1e-5, rtol=1e-5)
        assert a.shape == b.shape  # padded back to the batch's length
    pair = real[:, None, :, None] & real[:, None, None, :]
    for a, b in zip(grouped.attentions, one.attentions):
        torch.testing.assert_close(a[pair.expand_as(a)], b[pair.expand_as(b)], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grouped.values[2].transpose(1, 2)[real], one.values[2].transpose(1, 2)[real],
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grouped.qkv[(1, "query")][real], one.qkv[(1, "query")][real], atol=1e-5, rtol=1e-5)


def test_left_padding_runs_as_one_forward():
    model = eager_classifier(seed=3, layers=2)
    ids, mask, _ = padded_batch([5, 8, 3], seq=8)
    left_ids, left_mask = ids.flip(1), mask.flip(1)
    assert right_padded(mask) and not right_padded(left_mask)
    one = extract(model, left_ids, left_mask, sequence_logits=True)
    grouped = extract_in_groups(model, left_ids, left_mask, groups=3, sequence_logits=True)
    assert torch.equal(grouped.logits, one.logits)


def test_trainer_loss_and_gradients_equal_one_forward(tmp_path):
    """GlueTrainer.compute_loss with --length_groups: the batch's mean loss and its gradients."""
    from glue_eval.arguments import GlueTrainingArguments
    from glue_eval.trainer import GlueTrainer

    ids, mask, types = padded_batch([4, 16, 9, 15, 3, 11], seq=16)
    inputs = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types,
              "labels": torch.tensor([0, 1, 1, 0, 1, 0])}
    results = {}
    for groups in (1, 3):
        model = eager_classifier(seed=5, layers=2).train()  # no dropout: training mode is deterministic
        args = GlueTrainingArguments(output_dir=str(tmp_path / str(groups)), length_groups=groups, report_to=[],
                                     use_cpu=True)
        trainer = GlueTrainer(model=model, args=args)
        loss, out = trainer.compute_loss(model, dict(inputs), return_outputs=True)
        loss.backward()
        results[groups] = (loss.detach(), out["logits"].detach(),
                           {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    (l1, z1, g1), (l3, z3, g3) = results[1], results[3]
    # independent: the model's own loss from its logits over the whole batch
    torch.testing.assert_close(l1, torch.nn.functional.cross_entropy(z1, inputs["labels"]))
    torch.testing.assert_close(l3, l1, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(z3, z1, atol=1e-5, rtol=1e-5)
    assert g1.keys() == g3.keys()
    for name in g1:
        torch.testing.assert_close(g3[name], g1[name], atol=1e-5, rtol=1e-4, msg=name)


def test_zero_groups_is_refused(tmp_path):
    from distill.common.errors import UsageError
    from glue_eval.arguments import GlueTrainingArguments

    with pytest.raises(UsageError, match="--length_groups 0"):
        GlueTrainingArguments(output_dir=str(tmp_path), length_groups=0)


def test_distillation_loss_and_gradients_equal_one_forward(tmp_path):
    """glue-eval --teacher with --length_groups: the student's and the teacher's forwards in groups give the
    one forward's loss (kl + hid_mse + att_mse over a 2,4 map, hard_ce) and gradients."""
    from glue_eval.arguments import GlueArguments, GlueTrainingArguments
    from glue_eval.distillation import stage_objectives
    from glue_eval.trainer import DistillationTrainer

    ids, mask, types = padded_batch([6, 16, 9, 14, 3, 12, 16], seq=16)
    batch = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types,
             "labels": torch.tensor([0, 1, 1, 0, 1, 0, 1])}
    glue = GlueArguments(student_layers="2,4")
    weights = {"kl": 1.0, "hid_mse": 1.0, "att_mse": 1.0}
    results = {}
    for groups in (1, 3):
        student, teacher = eager_classifier(1, 2).train(), eager_classifier(2, 4)
        soft, hard = stage_objectives({**weights, "hard_ce": 1.0}, glue, student, teacher)
        args = GlueTrainingArguments(output_dir=str(tmp_path / str(groups)), use_cpu=True, report_to=[],
                                     length_groups=groups)
        trainer = DistillationTrainer(model=student, args=args, teacher=teacher, soft=soft, hard=hard)
        loss, terms, _ = trainer.distillation_loss(student, dict(batch))
        loss.backward()
        results[groups] = (loss.detach(), terms, {n: p.grad for n, p in student.named_parameters()})
    (l1, t1, g1), (l3, t3, g3) = results[1], results[3]
    assert set(t1) == {"kl", "hid_mse", "att_mse", "hard_ce"} and all(float(t1[k]) > 0 for k in t1)
    torch.testing.assert_close(l3, l1, atol=1e-6, rtol=1e-5)
    for name in t1:
        torch.testing.assert_close(t3[name], t1[name], atol=1e-6, rtol=1e-5, msg=name)
    for name in g1:
        torch.testing.assert_close(g3[name], g1[name], atol=1e-5, rtol=1e-4, msg=name)


def test_a_cell_records_its_length_groups_and_a_recorded_cell_is_not_reused_for_one_forward(tmp_path):
    """glue-eval's cell settings: length_groups joins them when above 1; a cell recorded with 3 is refused for a run
    of 1, and a cell recorded before the option (no key) is reused by either."""
    import json

    from distill.common.errors import UsageError
    from glue_eval.arguments import GlueArguments, GlueTrainingArguments
    from glue_eval.record import describe, done

    glue = GlueArguments(model="m", task="rte")
    settings = {g: describe(glue, GlueTrainingArguments(output_dir=str(tmp_path), length_groups=g)) for g in (1, 3)}
    assert "length_groups" not in settings[1] and settings[3]["length_groups"] == 3
    cell = tmp_path / "cell"
    cell.mkdir()
    (cell / "result.json").write_text(json.dumps({"settings": settings[3]}))
    assert done(str(cell), settings[3])
    with pytest.raises(UsageError, match="length_groups"):
        done(str(cell), settings[1])
    (cell / "result.json").write_text(json.dumps({"settings": settings[1]}))  # as recorded before the option
    assert done(str(cell), settings[3]) and done(str(cell), settings[1])


def test_the_loss_is_the_per_process_mean_under_several_processes_with_or_without_groups(tmp_path, monkeypatch):
    """Trainer multiplies a loss by the process count when it thinks the model normalised by the global item
    count; a sequence head does not, so GlueTrainer returns the plain mean on 2 processes, as on one, both ways."""
    from accelerate import Accelerator

    from glue_eval.arguments import GlueTrainingArguments
    from glue_eval.trainer import GlueTrainer

    ids, mask, types = padded_batch([4, 16, 9, 15], seq=16)
    labels = torch.tensor([0, 1, 1, 0])
    monkeypatch.setattr(Accelerator, "num_processes", property(lambda self: 2))
    for groups in (1, 2):
        model = eager_classifier(seed=5, layers=2).train()
        args = GlueTrainingArguments(output_dir=str(tmp_path / str(groups)), length_groups=groups, report_to=[],
                                     use_cpu=True, average_tokens_across_devices=True)
        trainer = GlueTrainer(model=model, args=args)
        loss = trainer.compute_loss(model, {"input_ids": ids, "attention_mask": mask, "token_type_ids": types,
                                            "labels": labels}, num_items_in_batch=torch.tensor(8))
        with torch.no_grad():
            expected = torch.nn.functional.cross_entropy(model(input_ids=ids, attention_mask=mask,
                                                               token_type_ids=types).logits, labels)
        torch.testing.assert_close(loss.detach(), expected, atol=1e-6, rtol=1e-5)
