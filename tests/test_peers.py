"""bench.peers on tiny models: its TextBrewer path and our side of the torchdistill comparison (glue-eval
--teacher's step, with and without the teacher cache), each checked against a float64 reference.

TextBrewer is a test dependency (the "test" extra), so none of this is skipped. The torchdistill path
needs its own environment (bench/requirements-peers.txt) and runs in the bench's quick mode.
"""

import copy
import json

import pytest
import textbrewer  # noqa: F401  (a missing test dependency must fail here, not skip)
import torch
import torch.nn.functional as F

from distill.common.errors import UsageError
from distill.models.student import build_student
from tests import tiny

LAYERS = [2, 4]
MASK_ID = 4  # [MASK] in tests/tiny.py's vocabulary


@pytest.fixture(scope="module")
def peers():
    return tiny.bench_module("peers")


@pytest.fixture(scope="module")
def models(bert_mlm_dir):
    from transformers import BertForMaskedLM

    teacher = BertForMaskedLM.from_pretrained(bert_mlm_dir).eval()
    teacher.requires_grad_(False)
    student, _ = build_student(teacher, LAYERS)
    return teacher, student.eval()


def padded_batch(seed: int = 0, batch: int = 3, seq: int = 20) -> dict:
    """Rows of different lengths (padding after them) with ~20% of the real tokens as MLM targets."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([seq, seq - 7, seq - 12][:batch])
    mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
    ids = torch.randint(5, tiny.VOCAB_SIZE, (batch, seq), generator=g) * mask
    ids[:, 0] = 2  # [CLS]
    targets = (torch.rand(batch, seq, generator=g) < 0.2) & mask.bool()
    targets[:, 0] = False
    targets[0, 3] = targets[1, 2] = targets[2, 1] = True  # every row has one
    labels = torch.where(targets, ids, torch.full_like(ids, -100))
    return {"input_ids": torch.where(targets, torch.full_like(ids, MASK_ID), ids), "attention_mask": mask,
            "mlm_labels": labels}


def reference_total(teacher, student, batch: dict, masked: bool) -> float:
    """``5*ce + 2*mlm + 1*cos`` at T=2 by hand, in float64, from the full outputs of both models."""
    t_model, s_model = [copy.deepcopy(m).double().eval() for m in (teacher, student)]
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["mlm_labels"]
    with torch.no_grad():
        t = t_model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        s = s_model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    T = 2.0
    rows = (labels != -100) if masked else mask.bool()
    p_t = torch.softmax(t.logits[rows] / T, -1)
    ce = (-(p_t * torch.log_softmax(s.logits[rows] / T, -1)).sum(-1)).mean() * T * T
    targets = labels != -100
    mlm = F.cross_entropy(s.logits[targets], labels[targets])
    real = mask.bool()
    cos = (1 - F.cosine_similarity(s.hidden_states[-1][real], t.hidden_states[-1][real], dim=-1)).mean()
    return float(5 * ce + 2 * mlm + cos)


def test_textbrewer_and_ours_compute_the_distilbert_loss_of_a_float64_reference(peers, models, tmp_path):
    teacher, student = models
    batch = padded_batch()
    match = peers.loss_match_textbrewer(teacher, student, LAYERS, batch, str(tmp_path))
    for variant in ("full", "masked"):
        ref = reference_total(teacher, student, batch, variant == "masked")
        assert match[variant]["ours"] == pytest.approx(ref, rel=1e-5)
        assert match[variant]["textbrewer"] == pytest.approx(ref, rel=1e-5)
        assert match[variant]["relative_difference"] <= 1e-5
    # the two variants read different rows, so they must differ (the mask reaches TextBrewer's soft loss)
    assert abs(match["full"]["textbrewer"] - match["masked"]["textbrewer"]) > 1e-3


def test_textbrewer_weights_carry_t_squared_and_without_it_the_totals_disagree(peers, models, tmp_path):
    teacher, student = models
    batch = padded_batch(seed=1)
    config = peers.textbrewer_config(teacher, student, restrict_ce_to_mask=False)
    assert config["kd_loss_weight"] == 5.0 * 2.0**2 and config["hard_label_weight"] == 2.0
    assert config["intermediate_matches"][0]["layer_T"] == 4 and config["intermediate_matches"][0]["layer_S"] == 2
    ours = peers.OursAgnostic(teacher, student, LAYERS, False).loss(batch)
    tb = peers.TextBrewerAgnostic(teacher, student, False, str(tmp_path))
    tb_batch = peers.TextBrewerAgnostic.batch(batch)
    with torch.no_grad():
        assert peers.relative_difference(ours, tb.loss(tb_batch)) <= 1e-5
        tb.distiller.d_config.kd_loss_weight = 5.0  # TextBrewer's convention taken literally: no T^2
        assert peers.relative_difference(ours, tb.loss(tb_batch)) > 1e-2


def test_one_textbrewer_step_clips_and_updates_the_student_and_leaves_the_teacher(peers, models, tmp_path):
    teacher, student0 = models
    student = copy.deepcopy(student0).train()
    before_t = {k: v.clone() for k, v in teacher.state_dict().items()}
    before_s = {k: v.clone() for k, v in student.state_dict().items()}
    tb = peers.TextBrewerAgnostic(teacher, student, True, str(tmp_path))
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3)
    loss = peers.textbrewer_step(tb, opt, peers.TextBrewerAgnostic.batch(padded_batch()), max_grad_norm=1.0)
    assert torch.isfinite(loss)
    assert all(p.grad is None for p in student.parameters())  # zeroed after the step
    changed = [k for k, v in student.state_dict().items() if not torch.equal(v, before_s[k])]
    assert any("encoder.layer" in k for k in changed) and any("embeddings" in k for k in changed)
    assert all(torch.equal(v, before_t[k]) for k, v in teacher.state_dict().items())


def test_the_bench_refuses_a_missing_peer_with_the_install_line(peers, monkeypatch, tmp_path):
    real = peers.importlib.import_module

    def without_torchdistill(name, *a, **k):
        if name == "torchdistill":
            raise ImportError("No module named 'torchdistill'")
        return real(name, *a, **k)

    monkeypatch.setattr(peers.importlib, "import_module", without_torchdistill)
    with pytest.raises(UsageError, match=r"torchdistill==1\.1\.5.*requirements-peers\.txt"):
        peers.main(["--only", "torchdistill", "--out", str(tmp_path / "p")])
    with pytest.raises(UsageError, match="'nope' is not one of textbrewer, torchdistill"):
        peers.main(["--only", "nope", "--out", str(tmp_path / "p")])
    assert not list(tmp_path.iterdir())  # nothing written


def test_smoke_run_of_the_textbrewer_part_writes_the_report(peers, tmp_path, capsys):
    out = tmp_path / "peers"
    assert peers.main(["--smoke", "--only", "textbrewer", "--out", str(out)]) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    tb = report["textbrewer"]
    assert tb["loss_match_textbrewer"] <= 1e-5
    assert set(tb["steps"]) == {"ours_full", "ours_masked", "textbrewer_full", "textbrewer_masked",
                                "textbrewer_full_default_adamw", "ours_full_whole_head"}
    assert tb["chunked_head_speedup"] == pytest.approx(tb["ratio_details"]["chunked_head"]["value"])
    assert tb["setup"]["optimizer"]["AdamW"]["fused"] is True  # both sides step with the same fused AdamW
    assert report["torchdistill"] is None and report["figures"]["vs_torchdistill_task"] is None
    for name in ("vs_textbrewer_full", "vs_textbrewer_masked", "vs_textbrewer_full_default_adamw"):
        assert tb[name] == pytest.approx(tb["ratio_details"][peers.ratio_key(name)]["value"]) and tb[name] > 0
    printed = dict(line.split(": ") for line in capsys.readouterr().out.strip().splitlines())
    assert set(printed) == {"loss_match_textbrewer", "vs_textbrewer_full", "vs_textbrewer_masked",
                            "vs_textbrewer_full_default_adamw"}
    md = out.with_suffix(".md").read_text()
    assert "kd_loss_weight" in md and "Not run: left out with --only." in md
    # the command as run: flags off their defaults, an --out outside the repository by its name alone
    assert report["command"] == "python -m bench.peers --smoke --only textbrewer --out peers"
    assert f"Generated by `{report['command']}`" in md


# ----------------------------------------------------------------- part 2, our side: glue-eval --teacher's step


@pytest.fixture(scope="module")
def task_setup(peers, tmp_path_factory):
    work = str(tmp_path_factory.mktemp("peers-task"))
    teacher_dir, teacher, student = peers.task_models(torch.device("cpu"), work, **peers.SMOKE_SHAPE)
    batch = peers.task_batch(3, teacher.config.vocab_size, torch.device("cpu"), seed=2)
    return work, teacher_dir, teacher, student, batch


def test_the_cache_rows_collate_back_into_the_padded_batch(peers, task_setup):
    *_, batch = task_setup
    dataset, with_rows = peers.rows_of(batch)
    lengths = batch["attention_mask"].sum(1).tolist()
    assert [len(ids) for ids in dataset["input_ids"]] == lengths and dataset["row"] == [0, 1, 2]
    padded = peers.pad_rows([dataset[i] for i in range(len(dataset))])
    assert set(padded) == {"input_ids", "token_type_ids", "attention_mask"}
    for key, value in padded.items():
        assert torch.equal(value, batch[key][:, :max(lengths)])
    assert torch.equal(with_rows["row"], torch.arange(3))


def test_glue_eval_step_cached_and_uncached_equals_a_float64_kl_plus_ce(peers, task_setup):
    work, teacher_dir, _, student0, batch = task_setup
    student = copy.deepcopy(student0)
    peers.set_dropout(student, 0.0)
    student.train()
    plain, no_build = peers.ours_task_trainer(teacher_dir, student, torch.device("cpu"), work)
    cached, build = peers.ours_task_trainer(teacher_dir, student, torch.device("cpu"), work, cache_over=batch)
    assert no_build is None
    peers.set_dropout(plain.teacher, 0.0)
    with torch.no_grad():
        ours = float(plain.compute_loss(student, dict(batch)))
        ours_cached = float(cached.compute_loss(student, peers.rows_of(batch)[1]))
    assert plain.teacher_forwards == 1 and cached.teacher_forwards == 0  # the cache held the logits

    # independent reference: both models in float64, KL(teacher || student) at T=1 over rows + CE on the labels
    t_model, s_model = [copy.deepcopy(m).double().eval() for m in (plain.teacher, student)]
    inputs = {k: batch[k] for k in ("input_ids", "token_type_ids", "attention_mask")}
    with torch.no_grad():
        t, s = t_model(**inputs).logits, s_model(**inputs).logits
    kl = (torch.softmax(t, -1) * (torch.log_softmax(t, -1) - torch.log_softmax(s, -1))).sum(-1).mean()
    ce = F.cross_entropy(s, batch["labels"])
    assert kl > 1e-3  # the confident teacher makes the soft term count
    # the bench's timed rebuild makes the same cache: the teacher's logits of every row
    assert torch.allclose(build().logits.double(), t, rtol=1e-5, atol=1e-6)
    assert torch.equal(build().logits, cached.teacher_cache.logits)
    assert ours == pytest.approx(float(kl + ce), rel=1e-5)
    assert ours_cached == pytest.approx(float(kl + ce), rel=1e-5)


def test_one_cached_glue_eval_step_updates_the_student_without_running_the_teacher(peers, task_setup):
    work, teacher_dir, _, student0, batch = task_setup
    student = copy.deepcopy(student0).train()
    trainer, _ = peers.ours_task_trainer(teacher_dir, student, torch.device("cpu"), work, cache_over=batch)
    before_t = {k: v.clone() for k, v in trainer.teacher.state_dict().items()}
    before_s = {k: v.clone() for k, v in student.state_dict().items()}
    loss = peers.ours_task_step(trainer, peers.rows_of(batch)[1])
    assert torch.isfinite(loss) and trainer.teacher_forwards == 0
    assert all(p.grad is None or not p.grad.any() for p in student.parameters())  # zeroed after the step
    changed = [k for k, v in student.state_dict().items() if not torch.equal(v, before_s[k])]
    assert any("classifier" in k for k in changed) and any("encoder.layer" in k for k in changed)
    assert all(torch.equal(v, before_t[k]) for k, v in trainer.teacher.state_dict().items())


def test_the_memory_finding_blames_the_order_only_when_running_the_teacher_first_closes_the_gap(peers):
    steps = {"ours_task": {"peak_memory_mb": 540.0}, "torchdistill_task": {"peak_memory_mb": 364.0},
             "ours_task_cached": {"peak_memory_mb": 347.0}}
    probe = {"ours_task_mb": 1033.0, "ours_task_cached_mb": 947.0, "torchdistill_task_mb": 947.0,
             "ours_task_teacher_first_mb": 947.5}
    text = peers.memory_finding(probe, steps)
    assert "optimiser is not the cause" in text and "+86.0 MB left is the order of the forwards" in text
    text = peers.memory_finding({**probe, "ours_task_teacher_first_mb": 1030.0, "ours_task_cached_mb": 990.0}, steps)
    assert "order of the forwards" not in text and "not the cause" not in text and "1030.0 MB" in text
