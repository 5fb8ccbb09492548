"""glue-eval --multitask end to end on two local keyword tasks, and the loop's steps against independent
computations: one-hot meta-batches = per-task steps, PCGrad = the float64 reference over per-task gradients,
a teacher's terms = KL computed from the teacher's own logits."""

import csv
import json
import random

import numpy as np
import pytest
import torch

from distill.common.errors import UsageError

from glue_eval.cli import main
from glue_eval.multitask import train as mtrain
from glue_eval.multitask.config import load_config
from glue_eval.multitask.model import build_multitask, load_multitask
from tests import tiny
from tests.test_multitask_pure import reference_pcgrad

KEYWORDS = {"city": ("no", "yes"), "school": ("absent", "present")}
FAST = ["--use_cpu", "--learning_rate", "3e-3", "--per_device_train_batch_size", "8", "--warmup_steps", "0.1",
        "--disable_tqdm", "true", "--logging_steps", "5"]


def _rows(keyword, labels, n, rng, noise=False):
    words = [w for w in tiny.WORDS if w not in KEYWORDS]
    rows = []
    for i in range(n):
        text = [rng.choice(words) for _ in range(rng.randint(3, 6))]
        if i % 2:
            text.insert(rng.randint(0, len(text)), keyword)
        rows.append((" ".join(text), rng.choice(labels) if noise else labels[i % 2]))
    return rows


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    """Two keyword tasks (different label names), a noisy copy of the first, and configs over them."""
    folder = tmp_path_factory.mktemp("mt_tasks")
    rng = random.Random(0)
    for keyword, labels in KEYWORDS.items():
        for split, n in (("train", 120), ("dev", 60)):
            with open(folder / f"{keyword}_{split}.csv", "w", newline="", encoding="utf-8") as f:
                csv.writer(f).writerows([("text", "label"), *_rows(keyword, labels, n, rng)])
        spec = {"name": keyword, "train": f"{keyword}_train.csv", "dev": f"{keyword}_dev.csv",
                "text_columns": ["text"], "label_column": "label", "labels": list(labels), "metric": "accuracy"}
        (folder / f"{keyword}.json").write_text(json.dumps(spec))
    return folder


def _config(folder, name, tasks_dir=None, **extra):
    where = f"{tasks_dir}/" if tasks_dir else ""
    raw = {"tasks": [{"task": f"{where}city.json", "head": {"layers": [16], "activation": "gelu"}},
                     {"task": f"{where}school.json"}], **extra}
    (folder / name).write_text(json.dumps(raw))
    return str(folder / name)


def _predict(model, task, texts, tokenizer):
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(task=task, **enc).logits.argmax(-1).tolist()


@pytest.mark.slow
@pytest.mark.parametrize("extra", [{"schedule": "per_task", "sampling": {"kind": "temperature", "temperature": 2}},
                                   {"schedule": {"mode": "hybrid", "window": 3, "patience": 1, "sum_every": 3},
                                    "gradient": "pcgrad"}])
def test_one_student_learns_both_tasks_and_the_saved_model_reproduces_its_scores(tasks, bert_mlm_dir, vocab_dir,
                                                                                tmp_path, extra, capsys):
    from transformers import AutoTokenizer

    config = _config(tmp_path, "mt.json", tasks_dir=tasks, **extra)
    out = tmp_path / "out"
    assert main(["--multitask", config, "--model", bert_mlm_dir, "--output_dir", str(out), "--seed", "0",
                 "--num_train_epochs", "4", *FAST]) == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "result.json").read_text())
    assert list(result["tasks"]) == ["city", "school"]
    assert result["average"] == pytest.approx(np.mean([r["score"] for r in result["tasks"].values()]))
    assert "| city |" in printed and "| school |" in printed and "| **average** |" in printed
    model = load_multitask(str(out / "model"))
    tokenizer = AutoTokenizer.from_pretrained(str(out / "model"))
    for keyword, labels in KEYWORDS.items():
        with open(tasks / f"{keyword}_dev.csv", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        predicted = _predict(model, keyword, [r["text"] for r in rows], tokenizer)
        accuracy = np.mean([labels[p] == r["label"] for p, r in zip(predicted, rows)])
        assert accuracy == pytest.approx(result["tasks"][keyword]["dev"]["validation"]["accuracy"])  # the saved model
        assert accuracy > 0.8  # chance is 0.5: both tasks learnt by one encoder
    if "gradient" in extra:
        assert result["train"]["kinds"]["sum"] > 0 and result["settings"]["gradient"] == "pcgrad"
        tally = result["train"]["pcgrad"]  # two tasks: each step looks at (1, 2) and (2, 1)
        assert tally["pairs"] == 2 * result["train"]["kinds"]["sum"] and 0 <= tally["conflicts"] <= tally["pairs"]
        assert tally["rate"] == pytest.approx(tally["conflicts"] / tally["pairs"])
    else:
        assert result["train"]["pcgrad"] is None


def _runs(tasks, tokenizer, config):
    from glue_eval.data import load_splits
    from glue_eval.encode import tokenize

    runs = []
    for entry in config.tasks:
        data = tokenize(entry.task, load_splits(entry.task, ["train", "validation"]), tokenizer, 32)
        train = data["train"].remove_columns(["text", "idx"])
        runs.append(mtrain.TaskRun(entry.task, entry.weight, train.add_column("row", list(range(len(train)))),
                                   {"validation": data["validation"].remove_columns(["idx"])}))
    return runs


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _setup(tasks, bert_mlm_dir, name, raw=None, **extra):
    from transformers import AutoTokenizer, DataCollatorWithPadding

    config = load_config(str(tasks / "pc.json") if raw else _config(tasks, name, **extra))
    tokenizer = AutoTokenizer.from_pretrained(bert_mlm_dir)
    collate = DataCollatorWithPadding(tokenizer)
    return config, _runs(tasks, tokenizer, config), collate


def test_a_meta_batch_with_one_hot_weights_is_a_per_task_step(tasks, bert_mlm_dir):
    import contextlib

    config, runs, collate = _setup(tasks, bert_mlm_dir, "onehot.json", schedule="sum")
    runs[0].weight, runs[1].weight = 1.0, 0.0  # one-hot on the first task
    torch.manual_seed(0)
    model = build_multitask(bert_mlm_dir, config.tasks).train()  # dropout on: the same draws in both steps
    grads, losses = [], []
    for kind in ("sum", "per_task"):
        streams = [mtrain.BatchStream(r.train, 8, collate, seed=k) for k, r in enumerate(runs)]
        torch.manual_seed(1)  # the first task's forward comes first either way: the same dropout draws
        loss, _ = mtrain.train_step(model, runs, streams, kind, 0, config, "cpu", None, contextlib.nullcontext)
        losses.append(loss)
        grads.append(_grads(model))
        model.zero_grad(set_to_none=True)
    assert losses[0] == losses[1]
    assert grads[0].keys() == grads[1].keys() and not any(k.startswith("heads.school") for k in grads[0])
    assert all(torch.equal(grads[0][k], grads[1][k]) for k in grads[0])


def test_the_task_sampler_and_each_tasks_row_order_draw_from_their_own_random_streams(tasks, bert_mlm_dir):
    config, runs, collate = _setup(tasks, bert_mlm_dir, "own_streams.json")

    def draws(seed, rank=0, world=1):
        streams, sampler = mtrain.streams_and_sampler(runs, config, 4, collate, seed, rank, world)
        return [sampler.rng.random(16)] + [s.rng.random(16) for s in streams]

    first = draws(7)
    # one seed used to feed both the sampler and task 0's permutations: the same numbers chose the task and the rows
    for i in range(len(first)):
        for j in range(i + 1, len(first)):
            assert not np.allclose(first[i], first[j]), (i, j)
    assert all(np.array_equal(a, b) for a, b in zip(first, draws(7)))  # the seed repeats the run
    assert all(np.array_equal(a, b) for a, b in zip(first, draws(7, rank=1, world=2)))  # every rank alike
    assert not np.allclose(first[0], draws(8)[0])


def test_pcgrad_in_the_loop_is_the_float64_reference_over_each_tasks_gradient(tasks, bert_mlm_dir):
    import contextlib

    from glue_eval.multitask.pcgrad import projection_orders

    spec = json.loads((tasks / "city.json").read_text())
    (tasks / "city_flip.json").write_text(json.dumps({**spec, "name": "city_flip", "labels": ["yes", "no"]}))
    raw = {"tasks": [{"task": "city.json", "weight": 2.0}, {"task": "city_flip.json"}], "schedule": "sum",
           "gradient": "pcgrad"}
    (tasks / "pc.json").write_text(json.dumps(raw))
    config, runs, collate = _setup(tasks, bert_mlm_dir, None, raw=raw)
    torch.manual_seed(0)
    model = build_multitask(bert_mlm_dir, config.tasks).eval()  # no dropout: every forward alike
    # The same head and the same rows with the labels the other way round: the two tasks' gradients conflict.
    model.heads["city_flip"].load_state_dict(model.heads["city"].state_dict())
    shared = list(model.encoder.parameters())
    per_task, heads = [], {}
    for run in runs:
        loss, _ = mtrain.run_loss(model, run, mtrain.BatchStream(run.train, 8, collate, seed=0).next(), "cpu")
        wrt = shared + list(model.heads[run.name].parameters())
        g = torch.autograd.grad(run.weight * loss, wrt, allow_unused=True)  # the pooler is never used
        g = [torch.zeros_like(p) if x is None else x for p, x in zip(wrt, g)]
        per_task.append(torch.cat([x.reshape(-1) for x in g[:len(shared)]]).double())
        heads[run.name] = g[len(shared):]
    assert float(per_task[0] @ per_task[1]) < 0  # they conflict: the projection acts
    streams = [mtrain.BatchStream(r.train, 8, collate, seed=0) for r in runs]
    tally, made = {}, []
    mtrain.train_step(model, runs, streams, "sum", None, config, "cpu", torch.Generator().manual_seed(5),
                      contextlib.nullcontext, tally)
    expected = reference_pcgrad(torch.stack(per_task), projection_orders(2, torch.Generator().manual_seed(5)), made)
    assert tally == {"pairs": 2, "conflicts": len(made)} and made
    got = torch.cat([p.grad.reshape(-1) if p.grad is not None else torch.zeros_like(p).reshape(-1)
                     for p in shared]).double()
    # float32 gradients and projection against float64: the nearly opposite gradients cancel, so the bound is
    # relative to the largest entry (the float32 rounding of the terms that cancel), far below what surgery moves
    scale = float(np.abs(expected).max())
    assert np.allclose(got.numpy(), expected, rtol=0, atol=1e-3 * scale)
    assert np.abs(got.numpy() - (per_task[0] + per_task[1]).numpy()).max() > 0.1 * scale
    for run in runs:  # a head's gradient is its own task's alone
        for p, g in zip(model.heads[run.name].parameters(), heads[run.name]):
            assert torch.allclose(p.grad, g, atol=1e-7)
    unused = [n for n, p in model.encoder.named_parameters() if "pooler" in n]
    assert unused and all(p.grad is None for n, p in model.encoder.named_parameters() if n in unused)


def test_a_tasks_teacher_terms_are_computed_from_the_teachers_own_logits(tasks, bert_mlm_dir, tmp_path):
    from transformers import BertForSequenceClassification

    teacher_dir = tmp_path / "teacher"
    torch.manual_seed(3)
    BertForSequenceClassification(tiny.make_config("bert", num_labels=2)).save_pretrained(str(teacher_dir))
    config_path = _config(tasks, "kd.json", distill_weights={"kl": 1.0, "hard_ce": 0.5})
    raw = json.loads(open(config_path).read())
    raw["tasks"][0]["teacher"] = str(teacher_dir)
    open(config_path, "w").write(json.dumps(raw))
    _, runs, collate = _setup(tasks, bert_mlm_dir, "kd_plain.json")
    config = load_config(config_path)
    torch.manual_seed(0)
    model = build_multitask(bert_mlm_dir, config.tasks).eval()
    from glue_eval.multitask.run import MultitaskArguments, attach_teachers
    from transformers import TrainingArguments

    glue = MultitaskArguments(model=bert_mlm_dir, temperature=2.0)
    args = TrainingArguments(output_dir=str(tmp_path / "o"), use_cpu=True, per_device_eval_batch_size=16)
    record = attach_teachers(runs, config, glue, args, model, collate)
    assert list(record) == ["city"] and runs[1].soft is None and runs[1].cache is None
    batch = mtrain.BatchStream(runs[0].train, 8, collate, seed=0).next()
    loss, terms = mtrain.run_loss(model, runs[0], batch, "cpu")
    teacher = BertForSequenceClassification.from_pretrained(str(teacher_dir)).eval()
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    with torch.no_grad():
        zt = teacher(**inputs).logits.double()
        zs = model(task="city", **inputs).logits.double()
    pt, log_ps = (zt / 2).softmax(-1), (zs / 2).log_softmax(-1)
    kl = 4 * (pt * (pt.log() - log_ps)).sum(-1).mean()  # T^2 KL at T = 2
    hard = torch.nn.functional.cross_entropy(zs, batch["labels"])
    assert float(terms["kl"]) == pytest.approx(float(kl), abs=1e-5)
    assert float(terms["hard_ce"]) == pytest.approx(float(hard), abs=1e-5)
    assert float(loss) == pytest.approx(float(kl + 0.5 * hard), abs=1e-5)


@pytest.mark.parametrize("extra_args, config_extra, message", [
    (["--task", "sst2"], {}, "--task does not go with --multitask: the tasks are the config's"),
    (["--teacher", "somewhere"], {}, "--teacher does not go with --multitask: teachers are per task"),
    ([], {"gradient": "pcgrad"}, "one task per batch has nothing to project"),
    (["--length_groups", "2"], {}, "--length_groups 2 does not go with --multitask"),
    (["--gradient_accumulation_steps", "4"], {}, "--gradient_accumulation_steps 4 does not go with --multitask (its "
                                                  "own loop does not read it)"),
    (["--label_smoothing_factor", "0.1"], {}, "--label_smoothing_factor 0.1 does not go with --multitask"),
    ([], {"distill_weights": {"hid_mse": 1.0}, "teacher": True}, "'hid_mse' compares intermediate features"),
])
def test_bad_input_is_one_line_with_nothing_written(tasks, bert_mlm_dir, tmp_path, capsys, extra_args,
                                                   config_extra, message):
    config_extra = dict(config_extra)
    teacher = config_extra.pop("teacher", False)
    path = _config(tmp_path, "bad.json", tasks_dir=tasks, **config_extra)
    if teacher:  # any model folder passes the config's check; the term is refused before it loads
        raw = json.loads(open(path).read())
        raw["tasks"][0]["teacher"] = bert_mlm_dir
        open(path, "w").write(json.dumps(raw))
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as info:
        main(["--multitask", path, "--model", bert_mlm_dir, "--output_dir", str(out), *extra_args, *FAST])
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and message in err[-1] and err[-1].startswith("error: ")
    assert not out.exists()


@pytest.mark.slow
def test_a_task_learns_from_its_own_teacher_alone_inside_the_multitask_run(tasks, bert_mlm_dir, vocab_dir, tmp_path):
    teacher_out = tmp_path / "teacher"
    main(["--model", bert_mlm_dir, "--task", str(tasks / "city.json"), "--output_dir", str(teacher_out),
          "--seed", "0", "--save_model", "--num_train_epochs", "3", *FAST])
    teacher = next(teacher_out.rglob("model"))
    rng = random.Random(1)
    with open(tasks / "city_train.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    with open(tmp_path / "noise.csv", "w", newline="", encoding="utf-8") as f:  # the labels are coin flips
        csv.writer(f).writerows([("text", "label"), *[(r["text"], rng.choice(["no", "yes"])) for r in rows]])
    spec = json.loads((tasks / "city.json").read_text())
    (tmp_path / "noisy_city.json").write_text(json.dumps(
        {**spec, "train": "noise.csv", "dev": str(tasks / "city_dev.csv")}))
    raw = {"tasks": [{"task": "noisy_city.json", "teacher": str(teacher)}, {"task": str(tasks / "school.json")}],
           "distill_weights": {"kl": 1.0}}
    (tmp_path / "kd.json").write_text(json.dumps(raw))
    out = tmp_path / "out"
    main(["--multitask", str(tmp_path / "kd.json"), "--model", tiny.save_model("bert_mlm", tmp_path / "s", vocab_dir,
                                                                               seed=1),
          "--output_dir", str(out), "--seed", "0", "--temperature", "2", "--num_train_epochs", "4", *FAST])
    result = json.loads((out / "result.json").read_text())
    assert result["train"]["teachers"]["city"]["weights"] == {"kl": 1.0}
    assert result["tasks"]["city"]["dev"]["validation"]["accuracy"] > 0.8  # the train labels are noise
    assert result["tasks"]["school"]["dev"]["validation"]["accuracy"] > 0.8


def test_a_regression_tasks_teacher_teaches_through_the_outputs_mse(tasks, bert_mlm_dir, tmp_path):
    """A regression task in a run whose distill_weights are kl + hard_ce: kl over one output is 0 (the teacher
    would teach nothing), so its teacher term is the outputs' MSE at kl's weight, equal to a float64 reference;
    the record says which weights the task got."""
    from transformers import AutoTokenizer, BertForSequenceClassification, DataCollatorWithPadding, TrainingArguments

    from glue_eval.multitask.run import MultitaskArguments, attach_teachers, regression_weights

    assert regression_weights({"kl": 1.0, "hard_ce": 0.5}) == {"out_mse": 1.0, "hard_ce": 0.5}
    assert regression_weights({"kl": 1.0, "ce": 0.5}) == {"out_mse": 1.5}
    rng = random.Random(1)
    for split, n in (("train", 40), ("dev", 20)):
        with open(tmp_path / f"score_{split}.csv", "w", newline="", encoding="utf-8") as f:
            rows = [(text, float(len(text.split()))) for text, _ in _rows("city", ("a", "b"), n, rng)]
            csv.writer(f).writerows([("text", "score"), *rows])
    (tmp_path / "score.json").write_text(json.dumps({
        "name": "score", "train": "score_train.csv", "dev": "score_dev.csv", "text_columns": ["text"],
        "label_column": "score", "regression": True, "metric": "pearson"}))
    teacher_dir = tmp_path / "teacher"
    torch.manual_seed(3)
    BertForSequenceClassification(tiny.make_config("bert", num_labels=1)).save_pretrained(str(teacher_dir))
    (tmp_path / "mt.json").write_text(json.dumps({"tasks": [{"task": "score.json", "teacher": str(teacher_dir)}],
                                                  "distill_weights": {"kl": 1.0, "hard_ce": 0.5}}))
    config = load_config(str(tmp_path / "mt.json"))
    tokenizer = AutoTokenizer.from_pretrained(bert_mlm_dir)
    collate = DataCollatorWithPadding(tokenizer)
    runs = _runs(tmp_path, tokenizer, config)
    torch.manual_seed(0)
    model = build_multitask(bert_mlm_dir, config.tasks).eval()
    args = TrainingArguments(output_dir=str(tmp_path / "o"), use_cpu=True, per_device_eval_batch_size=16)
    record = attach_teachers(runs, config, MultitaskArguments(model=bert_mlm_dir), args, model, collate)
    assert record["score"]["weights"] == {"out_mse": 1.0, "hard_ce": 0.5}
    batch = mtrain.BatchStream(runs[0].train, 8, collate, seed=0).next()
    loss, terms = mtrain.run_loss(model, runs[0], batch, "cpu")
    teacher = BertForSequenceClassification.from_pretrained(str(teacher_dir)).eval()
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    with torch.no_grad():
        zt = teacher(**inputs).logits.double().squeeze(-1)
        zs = model(task="score", **inputs).logits.double().squeeze(-1)
    out_mse, hard = ((zs - zt) ** 2).mean(), ((zs - batch["labels"].double()) ** 2).mean()
    assert float(terms["out_mse"]) == pytest.approx(float(out_mse), rel=1e-4) and float(out_mse) > 0
    assert float(loss) == pytest.approx(float(out_mse + 0.5 * hard), rel=1e-4)


def test_auto_precision_on_a_gpu_without_bf16_trains_in_fp32_not_a_refusal(tmp_path, monkeypatch):
    """--precision auto picks fp16 on a GPU without bf16 (V100, T4); the multi-task loop trains in fp32 or bf16,
    so it takes fp32 and says why, instead of refusing a --fp16 the user never gave."""
    import dataclasses

    from glue_eval.multitask import run

    def fp16_as_auto_would(glue, args):
        return dataclasses.replace(args, fp16=True, use_cpu=True), "precision: auto -> fp16 O1"

    monkeypatch.setattr("glue_eval.arguments.apply_precision", fp16_as_auto_would)
    monkeypatch.setattr("glue_eval.arguments.precision_check", lambda args: None)
    glue, args, line = run.parse(["--multitask", "x.json", "--model", "m", "--output_dir", str(tmp_path / "o")])
    assert not args.fp16 and not args.bf16 and line.startswith("precision: auto -> fp32")
    with pytest.raises(UsageError, match="drop --fp16"):  # asked for by name: still refused
        run.parse(["--multitask", "x.json", "--model", "m", "--output_dir", str(tmp_path / "o"), "--fp16"])


@pytest.mark.slow  # two torchrun ranks and one process: about 40 s
def test_under_torchrun_two_ranks_train_what_one_process_trains_on_their_joint_batch(tasks, vocab_dir, tmp_path):
    """The whole multi-task loop on two gloo ranks of 4 examples each against one process of 8: rank r reads
    positions r, r+2, ... of the shared permutation, so the two batches together are the one process's batch,
    and averaging the ranks' mean losses' gradients is its mean's. Without dropout the runs agree."""
    import os
    import shutil
    import subprocess
    import sys

    from safetensors.torch import load_file

    model = tiny.save_model("bert_mlm", tmp_path / "no_dropout", vocab_dir, hidden_dropout_prob=0.0,
                            attention_probs_dropout_prob=0.0)
    raw = {"tasks": [{"task": f"{tasks}/city.json", "head": {"layers": [16], "dropout": 0.0}},
                     {"task": f"{tasks}/school.json", "head": {"dropout": 0.0}}], "schedule": "sum"}
    (tmp_path / "mt.json").write_text(json.dumps(raw))
    common = ["--multitask", str(tmp_path / "mt.json"), "--model", model, "--seed", "0", "--max_steps", "6",
              "--use_cpu", "--learning_rate", "3e-3", "--warmup_steps", "0", "--disable_tqdm", "true",
              "--logging_steps", "2", "--max_grad_norm", "1.0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "--no-python", shutil.which("glue-eval"), *common, "--output_dir", str(tmp_path / "two"),
                          "--per_device_train_batch_size", "4"], capture_output=True, text=True, timeout=300, env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    assert main([*common, "--output_dir", str(tmp_path / "one"), "--per_device_train_batch_size", "8"]) == 0
    results = [json.loads((tmp_path / run / "result.json").read_text()) for run in ("two", "one")]
    assert results[0]["train"]["steps"] == results[1]["train"]["steps"] == 6
    assert results[0]["train"]["kinds"] == {"sum": 6, "per_task": 0}
    # The logged loss and each task's terms are the global batch's (rank 0 once logged its own shard's terms).
    # Adam turns the float32 noise of gradients that are nearly zero into whole steps of either sign, so the
    # two runs part by a little: far less than another batch composition would move them.
    for two_log, one_log in zip(results[0]["train"]["logs"], results[1]["train"]["logs"], strict=True):
        assert two_log["loss"] == pytest.approx(one_log["loss"], abs=2e-3)
        for task in ("city", "school"):
            assert two_log["terms"][task]["task"] == pytest.approx(one_log["terms"][task]["task"], abs=2e-3)
    weights = []
    for run in ("two", "one", "no_dropout"):
        folder = tmp_path / run / ("model" if run != "no_dropout" else "")
        weights.append({k.removeprefix("bert."): v for k, v in load_file(folder / "model.safetensors").items()})
    apart = sum(float((weights[0][k] - weights[1][k]).abs().sum()) for k in weights[1])
    moved = sum(float((weights[1][k] - weights[2][k]).abs().sum()) for k in weights[1] if k in weights[2])
    assert moved > 1.0 and apart < 0.02 * moved, (apart, moved)
