"""Multi-task training's pure parts against hand-computed values and float64 references: the config, the task
samplers, the hybrid schedule, the weighted loss sum and PCGrad (one process and two gloo ranks)."""

import itertools
import json
from collections import Counter

import numpy as np
import pytest
import torch

from distill.common.errors import UsageError
from glue_eval.multitask.combine import weighted_sum
from glue_eval.multitask.config import HeadSpec, Sampling, Schedule, load_config
from glue_eval.multitask.pcgrad import (distributed_pcgrad, mean_over_ranks, pcgrad, project_conflicts,
                                        projection_orders)
from glue_eval.multitask.sampling import HybridSchedule, TaskSampler, task_probabilities

# --- the config ---------------------------------------------------------------------------------


def _spec(folder, name, labels=("neg", "pos")):
    (folder / f"{name}.csv").write_text("text,label\nthe city,pos\nthe school,neg\n")
    spec = {"name": name, "train": f"{name}.csv", "dev": f"{name}.csv", "text_columns": ["text"],
            "label_column": "label", "labels": list(labels), "metric": "accuracy"}
    (folder / f"{name}.json").write_text(json.dumps(spec))


def _config(folder, raw) -> str:
    path = folder / "mt.json"
    path.write_text(json.dumps(raw))
    return str(path)


def test_a_config_names_tasks_heads_and_how_they_train(tmp_path):
    _spec(tmp_path, "pol")
    _spec(tmp_path, "topic", ("a", "b", "c"))
    cfg = load_config(_config(tmp_path, {
        "tasks": [{"task": "pol.json", "head": {"layers": [16, 8], "activation": "relu", "dropout": 0.0},
                   "weight": 2},
                  {"task": "topic.json", "head": {"transformers": "RobertaClassificationHead",
                                                  "config": {"classifier_dropout": 0.0}}},
                  {"task": "sst2"}],
        "sampling": {"kind": "temperature", "temperature": 2}, "schedule": {"mode": "hybrid", "sum_every": 4},
        "gradient": "pcgrad"}))
    assert cfg.names == ("pol", "topic", "sst2")
    assert cfg.entry("pol").head == HeadSpec(layers=(16, 8), activation="relu", dropout=0.0)
    assert cfg.entry("pol").weight == 2.0 and cfg.entry("topic").task.num_labels == 3
    assert cfg.entry("topic").head.kind == "transformers" and cfg.entry("sst2").head == HeadSpec()
    assert cfg.sampling == Sampling(kind="temperature", temperature=2.0)
    assert cfg.schedule == Schedule(mode="hybrid", sum_every=4) and cfg.gradient == "pcgrad"


@pytest.mark.parametrize("raw, message", [
    ({"tasks": [{"task": "pol.json"}], "sampler": "uniform"}, "unknown keys ['sampler']"),
    ({"tasks": []}, '"tasks" must be a non-empty list'),
    ({"tasks": [{"task": "pol.json"}, {"task": "pol.json"}]}, "task 'pol' is listed twice"),
    ({"tasks": [{"task": "pol.json", "head": {"layers": [0]}}]}, "head layers [0] must be a list of widths >= 1"),
    ({"tasks": [{"task": "pol.json", "head": {"activation": "swish2"}}]}, "unknown activation 'swish2'"),
    ({"tasks": [{"task": "pol.json", "weight": -1}]}, "weight is -1: give a number >= 0"),
    ({"tasks": [{"task": "pol.json", "teacher": "nowhere"}]}, "is not a model folder (no config.json)"),
    ({"tasks": [{"task": "pol.json"}], "gradient": "pcgrad"}, 'one task per batch has nothing to project'),
    ({"tasks": [{"task": "pol.json"}], "sampling": {"kind": "uniform", "temperature": 2}},
     '"temperature" is for kind "temperature"'),
    ({"tasks": [{"task": "pol.json"}], "sampling": {"kind": "temperature", "temperature": 0}},
     "temperature is 0: give a number > 0"),
    ({"tasks": [{"task": "pol.json"}], "schedule": {"mode": "hybrid", "window": 0}}, "window is 0"),
    ({"tasks": [{"task": "pol.json"}], "distill_weights": {"kl": 1}}, 'no task names a "teacher"'),
    ({"tasks": [{"task": "pol.json"}, {"task": "squad", "head": {"transformers": "RobertaClassificationHead"}}]},
     "task 'squad' is extractive QA: its head is a span head"),
])
def test_a_bad_config_is_one_line_naming_the_value(tmp_path, raw, message):
    _spec(tmp_path, "pol")
    with pytest.raises(UsageError) as info:
        load_config(_config(tmp_path, raw))
    assert message in str(info.value) and "\n" not in str(info.value)


# --- samplers ---------------------------------------------------------------------------------------

SIZES = [100, 400, 1600]


@pytest.mark.parametrize("sampling, progress, expected", [
    (Sampling("proportional"), 0.0, [1 / 21, 4 / 21, 16 / 21]),
    (Sampling("uniform"), 0.0, [1 / 3, 1 / 3, 1 / 3]),
    (Sampling("temperature", temperature=2.0), 0.0, [10 / 70, 20 / 70, 40 / 70]),  # square roots 10, 20, 40
    (Sampling("annealed"), 0.0, [1 / 21, 4 / 21, 16 / 21]),  # starts proportional
    (Sampling("annealed", final_exponent=0.5), 1.0, [10 / 70, 20 / 70, 40 / 70]),  # ends at n^0.5
    (Sampling("annealed", final_exponent=0.0), 0.5, [10 / 70, 20 / 70, 40 / 70]),  # halfway from 1 to 0
])
def test_task_probabilities_are_the_hand_computed_ones(sampling, progress, expected):
    assert np.allclose(task_probabilities(SIZES, sampling, progress), expected, rtol=0, atol=1e-15)


def test_annealing_follows_stickland_and_murray():
    # BERT and PALs: alpha = 1 - 0.8 (e - 1) / (E - 1) over epochs e = 1..E; progress = (e - 1) / (E - 1).
    epochs = 5
    for e in range(1, epochs + 1):
        alpha = 1 - 0.8 * (e - 1) / (epochs - 1)
        reference = np.array([n ** alpha for n in SIZES], dtype=np.float64)
        got = task_probabilities(SIZES, Sampling("annealed", final_exponent=0.2), (e - 1) / (epochs - 1))
        assert np.allclose(got, reference / reference.sum(), rtol=1e-14, atol=0)


def test_draws_repeat_with_the_seed_and_follow_the_probabilities():
    sampling = Sampling("temperature", temperature=2.0)
    a, b = TaskSampler(SIZES, sampling, seed=3), TaskSampler(SIZES, sampling, seed=3)
    draws = [a.draw() for _ in range(20000)]
    assert draws == [b.draw() for _ in range(20000)]
    assert draws[:50] != [TaskSampler(SIZES, sampling, seed=4).draw() for _ in range(50)]
    counts = Counter(draws)
    for i, p in enumerate([1 / 7, 2 / 7, 4 / 7]):
        sigma = (20000 * p * (1 - p)) ** 0.5
        assert abs(counts[i] - 20000 * p) < 4 * sigma


def test_the_hybrid_schedule_sums_until_the_plateau_then_steps_per_task_with_a_sum_every_n():
    schedule = HybridSchedule(Schedule(mode="hybrid", window=2, patience=2, sum_every=3))
    losses = [5, 5, 4, 4, 4, 4, 4.5, 4.5]  # windows: 5 (best), 4 (best), 4 (stale 1), 4.5 (stale 2: switch)
    for loss in losses:
        assert schedule.next_kind() == "sum"
        schedule.observe("sum", loss)
    assert schedule.switched_at == 8
    kinds = []
    for _ in range(7):
        kinds.append(schedule.next_kind())
        schedule.observe(kinds[-1], 1.0)
    assert kinds == ["per_task", "per_task", "sum"] * 2 + ["per_task"]
    patient = HybridSchedule(Schedule(mode="hybrid", window=2, patience=2, min_delta=0.0))
    for loss in [5, 5, 4, 4, 3, 3, 2, 2]:  # always improving: never switches
        patient.observe(patient.next_kind(), loss)
    assert patient.switched_at is None
    strict = HybridSchedule(Schedule(mode="hybrid", window=1, patience=2, min_delta=1.5))
    for loss in [5, 4, 3.4]:  # 4 is not 1.5 below 5 (stale), 3.4 is (a new best): no switch yet
        strict.observe(strict.next_kind(), loss)
    assert strict.switched_at is None
    for loss in [2.5, 2.0]:  # 0.9 and 1.4 below 3.4: stale twice
        strict.observe(strict.next_kind(), loss)
    assert strict.switched_at == 5
    for mode in ("sum", "per_task"):
        fixed = HybridSchedule(Schedule(mode=mode))
        for _ in range(5):
            assert fixed.next_kind() == mode
            fixed.observe(mode, 100.0)


# --- loss combination ------------------------------------------------------------------------------

def _task_losses(w: torch.Tensor):
    x = torch.tensor([[1.0, 2.0], [0.5, -1.0]], dtype=w.dtype)
    return {"a": ((x @ w) ** 2).mean(), "b": (x @ w).sin().sum(), "c": (w * w).sum() * 0.3}


def test_one_hot_weights_give_exactly_that_tasks_loss_and_gradient():
    for task in ("a", "b", "c"):
        w = torch.tensor([0.3, -0.7], requires_grad=True)
        alone = _task_losses(w)[task]
        (g_alone,) = torch.autograd.grad(alone, w)
        combined = weighted_sum(_task_losses(w), {k: float(k == task) for k in "abc"})
        (g_combined,) = torch.autograd.grad(combined, w)
        assert torch.equal(combined, alone) and torch.equal(g_combined, g_alone)


def test_the_weighted_sum_is_the_hand_sum():
    w = torch.tensor([0.3, -0.7], dtype=torch.float64)
    losses = _task_losses(w)
    expected = 2.0 * float(losses["a"]) + 0.5 * float(losses["b"]) + float(losses["c"])
    assert float(weighted_sum(losses, {"a": 2.0, "b": 0.5})) == pytest.approx(expected, rel=1e-15)
    with pytest.raises(ValueError, match="has weight 0"):
        weighted_sum(losses, {"a": 0, "b": 0, "c": 0})


# --- PCGrad ----------------------------------------------------------------------------------------

def reference_pcgrad(grads, orders, projections=None):
    """Yu et al.'s Algorithm 1 in float64 Python: project the running g_i off each ORIGINAL g_j it conflicts
    with, in the given order; sum. ``projections``: a list that gets one entry per projection made."""
    grads = [[float(v) for v in g] for g in grads]
    total = [0.0] * len(grads[0])
    for i, order in enumerate(orders):
        g = list(grads[i])
        for j in order:
            dot = sum(a * b for a, b in zip(g, grads[j]))
            if dot < 0:
                norm = sum(b * b for b in grads[j])
                g = [a - dot / norm * b for a, b in zip(g, grads[j])]
                if projections is not None:
                    projections.append((i, j))
        total = [t + a for t, a in zip(total, g)]
    return total


def test_two_conflicting_gradients_give_the_hand_computed_update():
    grads = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])  # g1.g2 = -1: g1 -> (0.5, 0.5), g2 -> (0, 1)
    tally = {}
    assert project_conflicts(grads, [[1], [0]], tally).tolist() == [[0.5, 0.5], [0.0, 1.0]]
    assert tally == {"pairs": 2, "conflicts": 2}  # each projected off the other
    assert pcgrad(grads, torch.Generator().manual_seed(0), tally).tolist() == [0.5, 1.5]
    assert tally == {"pairs": 4, "conflicts": 4}  # added to, step after step
    agreeing = torch.tensor([[1.0, 0.0], [1.0, 1.0]])  # no conflict: the plain sum
    none = {}
    assert pcgrad(agreeing, torch.Generator().manual_seed(0), none).tolist() == [2.0, 1.0]
    assert none == {"pairs": 2, "conflicts": 0}


def test_the_order_of_the_other_tasks_matters_and_is_drawn_from_the_seed():
    grads = torch.tensor([[1.0, 0.0], [-1.0, 2.0], [-1.0, -1.0]])
    # task 1 after 2 then 3: (0.8, 0.4) then (0.2, -0.2); after 3 then 2: (0.5, -0.5) then (0.2, 0.1)
    assert np.allclose(project_conflicts(grads, [[1, 2], [0], [0]])[0], [0.2, -0.2], atol=1e-7)
    assert np.allclose(project_conflicts(grads, [[2, 1], [0], [0]])[0], [0.2, 0.1], atol=1e-7)
    seen = Counter()
    for seed in range(400):
        orders = projection_orders(3, torch.Generator().manual_seed(seed))
        assert orders == projection_orders(3, torch.Generator().manual_seed(seed))  # the seed fixes the order
        assert [sorted(o) for o in orders] == [[1, 2], [0, 2], [0, 1]]
        seen[tuple(orders[0])] += 1
        got = pcgrad(grads, torch.Generator().manual_seed(seed))
        assert np.allclose(got, reference_pcgrad(grads, orders), rtol=0, atol=1e-6)
    assert set(seen) == {(1, 2), (2, 1)} and min(seen.values()) > 150  # both orders, about evenly


def test_pcgrad_matches_the_float64_reference_on_many_conflicting_gradients():
    g = torch.Generator().manual_seed(0)
    for k in (2, 3, 4):
        base = torch.randn(50, generator=g)
        grads = torch.stack([(-1) ** i * base * (i + 1) + torch.randn(50, generator=g) for i in range(k)])
        assert any(float(grads[i] @ grads[j]) < 0 for i, j in itertools.combinations(range(k), 2))
        for seed in range(5):
            orders = projection_orders(k, torch.Generator().manual_seed(seed))
            tally, made = {}, []
            got = pcgrad(grads, torch.Generator().manual_seed(seed), tally)
            ref = np.array(reference_pcgrad(grads.double(), orders, made))
            assert tally == {"pairs": k * (k - 1), "conflicts": len(made)} and made
            assert np.allclose(got.double().numpy(), ref, rtol=1e-5, atol=1e-5)
            assert not np.allclose(ref, grads.double().sum(0).numpy(), atol=1e-3)  # surgery changed the sum


def _two_rank_worker(rank, store, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    g = torch.Generator().manual_seed(100 + rank)  # each rank: its own shard's task gradients
    grads = torch.randn(3, 20, generator=g)
    grads[1] -= 2 * grads[0]  # conflicts on every rank
    torch.save(grads.clone(), f"{out}/local{rank}.pt")
    update = distributed_pcgrad(grads, torch.Generator().manual_seed(7))
    torch.save(update, f"{out}/update{rank}.pt")
    dist.destroy_process_group()


def test_under_ddp_each_rank_gets_the_pcgrad_of_the_averaged_task_gradients(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_two_rank_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2)
    local = [torch.load(tmp_path / f"local{r}.pt") for r in (0, 1)]
    updates = [torch.load(tmp_path / f"update{r}.pt") for r in (0, 1)]
    assert torch.equal(updates[0], updates[1])  # every rank steps alike: no further all-reduce needed
    mean = (local[0].double() + local[1].double()) / 2
    orders = projection_orders(3, torch.Generator().manual_seed(7))
    assert np.allclose(updates[0].double().numpy(), reference_pcgrad(mean, orders), rtol=1e-5, atol=1e-6)
    # the other order of operations (project on each rank, then average) is another update
    per_rank = sum(np.array(reference_pcgrad(x.double(), orders)) for x in local) / 2
    assert not np.allclose(per_rank, reference_pcgrad(mean, orders), atol=1e-3)


# each rank's summed loss on its own shard: rank 0's stops improving early, rank 1's keeps improving longer
RANK_LOSSES = {0: [5.0, 4.0, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0],
               1: [5.0, 4.0, 3.0, 2.0, 1.5, 1.0, 0.9, 0.8, 0.8, 0.8, 0.8, 0.8]}
HYBRID = Schedule(mode="hybrid", window=2, patience=1, sum_every=3)


def _switch_at(losses) -> int | None:
    schedule = HybridSchedule(HYBRID)
    for loss in losses:
        schedule.observe(schedule.next_kind(), loss)
    return schedule.switched_at


def _hybrid_worker(rank, store, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    seen = [mean_over_ranks(x) for x in RANK_LOSSES[rank]]  # what train_multitask feeds its schedule
    torch.save({"switch": _switch_at(seen), "own": _switch_at(RANK_LOSSES[rank]), "seen": seen},
               f"{out}/hybrid{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes: about 15 s
def test_under_ddp_every_rank_switches_the_hybrid_schedule_on_the_same_step(tmp_path):
    """Each rank's own loss would switch its schedule on a different step (then one rank runs meta-batches while
    the other runs per-task steps, and their all-reduces no longer match); the loss averaged over the ranks
    switches them together, where one process fed the global batch's mean would."""
    import torch.multiprocessing as mp

    assert _switch_at(RANK_LOSSES[0]) != _switch_at(RANK_LOSSES[1])  # the premise: the ranks' own losses disagree
    mp.spawn(_hybrid_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2)
    got = [torch.load(tmp_path / f"hybrid{r}.pt") for r in (0, 1)]
    mean = [(a + b) / 2 for a, b in zip(RANK_LOSSES[0], RANK_LOSSES[1])]
    assert got[0]["seen"] == got[1]["seen"] == pytest.approx(mean)
    assert got[0]["switch"] == got[1]["switch"] == _switch_at(mean) is not None
    assert mean_over_ranks(2.5) == 2.5  # one process: its own


@pytest.mark.parametrize("n, world, batch", [(5, 2, 2), (7, 3, 2), (1, 2, 4), (12, 2, 3)])
def test_ranks_read_disjoint_full_batches_of_one_permutation_and_reshuffle_together(n, world, batch):
    """Each rank's stream over one task, the same seed on every rank: in every epoch the ranks' rows are one
    shuffled order split between them (padded from its start to full batches, as DistributedSampler pads), so
    every row is read, none twice in a step beyond the padding, and all ranks start a new epoch on the same step
    (uneven shares once let a rank reshuffle alone and read the rows another rank was reading)."""
    from datasets import Dataset

    from glue_eval.multitask.train import BatchStream

    rows = Dataset.from_dict({"input_ids": [[i] for i in range(n)], "row": list(range(n))})
    streams = [BatchStream(rows, batch, lambda xs: [x["row"] for x in xs], seed=9, rank=r, world=world)
               for r in range(world)]
    per_epoch = streams[0].per_epoch
    assert per_epoch == -(-n // (batch * world))
    for epoch in range(3):
        steps = [[s.next() for s in streams] for _ in range(per_epoch)]
        read = [i for step in steps for b in step for i in b]
        assert all(len(b) == batch for step in steps for b in step)  # full batches on every rank
        assert sorted(set(read)) == list(range(n)) and len(read) == per_epoch * batch * world
        assert len(read) - len(set(read)) == per_epoch * batch * world - n  # repeats: the padding only
    one = BatchStream(rows, batch, lambda xs: [x["row"] for x in xs], seed=9)  # one process: no padding
    assert sorted(i for _ in range(-(-n // batch)) for i in one.next()) == list(range(n))
