"""Extractive QA as one task of a multi-task run, against the single-task QA machinery run on the same weights: the
loss of a batch of windows (plain, and with a QA teacher's span terms), and the EM/F1 evaluation (an independent
single-task call on the saved encoder with the span head's weights)."""

import json

import pytest
import torch

from distill.common.errors import UsageError
from glue_eval.cli import main
from glue_eval.multitask import train as mtrain
from glue_eval.multitask.config import load_config, parse_config
from glue_eval.multitask.model import build_multitask, load_multitask
from tests import qa_sets, tiny
from tests.test_multitask_run import _config, tasks  # noqa: F401 - the keyword tasks fixture

FAST = ["--use_cpu", "--precision", "fp32", "--max_seq_length", "48", "--doc_stride", "16", "--learning_rate", "3e-3",
        "--per_device_train_batch_size", "8", "--disable_tqdm", "true", "--logging_steps", "5"]


@pytest.fixture(scope="module")
def squad(tmp_path_factory):
    """SQuAD's files of year questions (tests/qa_sets.py) and a QA task spec over them."""
    paragraphs = qa_sets.year_paragraphs()
    folder = tmp_path_factory.mktemp("mt_squad")
    (folder / "train.json").write_text(json.dumps(qa_sets.squad_document(paragraphs[:80], "t")))
    (folder / "dev.json").write_text(json.dumps(qa_sets.squad_document(paragraphs[80:100], "d")))
    spec = {"name": "years", "type": "extractive_qa", "train": "train.json", "dev": "dev.json"}
    (folder / "years.json").write_text(json.dumps(spec))
    return folder


def _mixed_config(folder, tasks, squad, name="mixed.json", **extra):  # noqa: F811 - the fixture's value
    raw = {"tasks": [{"task": str(tasks / "city.json")}, {"task": str(squad / "years.json"), **extra.pop("qa", {})}],
           **extra}
    (folder / name).write_text(json.dumps(raw))
    return str(folder / name)


def _qa_twin(model, name):
    """A ``BertForQuestionAnswering`` holding the multi-task model's encoder and ``name``'s span head."""
    from transformers import BertForQuestionAnswering

    twin = BertForQuestionAnswering(model.encoder.config)
    missing, unexpected = twin.bert.load_state_dict(model.encoder.state_dict(), strict=False)
    assert not missing and all(k.startswith("pooler.") for k in unexpected)
    twin.qa_outputs.load_state_dict(model.heads[name].qa_outputs.state_dict())
    return twin.eval()


def _qa_run(squad, tokenizer, config):
    from transformers import TrainingArguments  # noqa: F401 - glue-eval's arguments below need it loaded

    from glue_eval.arguments import GlueArguments
    from glue_eval.data import load_splits
    from glue_eval.encode import tokenize
    from glue_eval.multitask.qa import qa_run_fields

    entry = config.entry("years")
    data = tokenize(entry.task, load_splits(entry.task, ["train", "validation"]), tokenizer, 48, 16)
    return mtrain.TaskRun(entry.task, 1.0, **qa_run_fields(entry.task, data, GlueArguments(model="x", doc_stride=16))), data


def test_a_qa_task_takes_a_span_head_and_refuses_classification_heads(tmp_path, tasks, squad):  # noqa: F811
    config = load_config(_mixed_config(tmp_path, tasks, squad))
    assert config.entry("years").head.kind == "span" and config.entry("years").head.dropout == 0.0
    assert config.entry("city").head.kind == "stack"
    stacked = load_config(_mixed_config(tmp_path, tasks, squad, "s.json", qa={"head": {"layers": [8]}}))
    assert stacked.entry("years").head.layers == (8,)
    base = {"tasks": [{"task": str(squad / "years.json"), "head": {"transformers": "RobertaClassificationHead"}}]}
    with pytest.raises(UsageError, match="is extractive QA: its head is a span head"):
        parse_config(base)
    with pytest.raises(UsageError, match="'pooling'"):
        parse_config({"tasks": [{"task": str(squad / "years.json"), "head": {"pooling": "mean"}}]})
    with pytest.raises(UsageError, match="a span head is for extractive QA tasks"):
        parse_config({"tasks": [{"task": str(tasks / "city.json"), "head": {"span": True}}]})


def test_the_qa_loss_of_a_batch_is_the_single_task_qa_models_own(tmp_path, tasks, squad, bert_mlm_dir):  # noqa: F811
    from transformers import AutoTokenizer, DataCollatorWithPadding

    config = load_config(_mixed_config(tmp_path, tasks, squad))
    tokenizer = AutoTokenizer.from_pretrained(bert_mlm_dir)
    collate = DataCollatorWithPadding(tokenizer)
    run, _ = _qa_run(squad, tokenizer, config)
    torch.manual_seed(0)
    model = build_multitask(bert_mlm_dir, config.tasks).eval()
    batch = mtrain.BatchStream(run.train, 32, collate, seed=0).next()
    assert (batch["attention_mask"] == 0).any() and (batch["start_positions"] > 0).any()  # padding, real spans
    loss, terms = mtrain.run_loss(model, run, batch, "cpu")
    twin = _qa_twin(model, "years")
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids", "start_positions",
                                     "end_positions")}
    with torch.no_grad():
        expected = twin(**inputs)
    assert float(loss.detach()) == pytest.approx(float(expected.loss), rel=1e-6) and set(terms) == {"task"}
    with torch.no_grad():
        out = model(task="years", **{k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")})
    assert torch.allclose(out.start_logits, expected.start_logits, atol=1e-6)
    assert torch.allclose(out.end_logits, expected.end_logits, atol=1e-6)


def test_a_qa_teachers_terms_are_the_single_task_stage_s_on_the_same_batch(tmp_path, tasks, squad, bert_mlm_dir):  # noqa: F811
    from transformers import AutoTokenizer, BertForQuestionAnswering, DataCollatorWithPadding, TrainingArguments

    from glue_eval.multitask.run import MultitaskArguments, attach_teachers
    from glue_eval.qa_distill import QADistillationTrainer, qa_stage_objectives

    torch.manual_seed(3)
    teacher_dir = tmp_path / "qa_teacher"
    BertForQuestionAnswering(tiny.make_config("bert")).save_pretrained(str(teacher_dir))
    weights = {"kl": 1.0, "hard_ce": 0.5}
    config = load_config(_mixed_config(tmp_path, tasks, squad, qa={"teacher": str(teacher_dir)},
                                       distill_weights=weights))
    tokenizer = AutoTokenizer.from_pretrained(bert_mlm_dir)
    collate = DataCollatorWithPadding(tokenizer)
    run, _ = _qa_run(squad, tokenizer, config)
    torch.manual_seed(0)
    model = build_multitask(bert_mlm_dir, config.tasks).eval()
    glue = MultitaskArguments(model=bert_mlm_dir, temperature=2.0)
    args = TrainingArguments(output_dir=str(tmp_path / "o"), use_cpu=True, per_device_eval_batch_size=16,
                             report_to=[])
    record = attach_teachers([run], config, glue, args, model, collate)
    assert record["years"]["cached_rows"] == len(run.train) and run.cache is not None
    batch = mtrain.BatchStream(run.train, 32, collate, seed=0).next()
    assert (batch["attention_mask"] == 0).any()  # padding: the span terms must leave it out
    loss, terms = mtrain.run_loss(model, run, batch, "cpu")
    # the single-task stage: the same student as a QA model, the teacher run (not cached), the same objectives
    twin = _qa_twin(model, "years")
    teacher = BertForQuestionAnswering.from_pretrained(str(teacher_dir)).eval()
    _, span, hard = qa_stage_objectives(weights, glue, twin, teacher)
    trainer = QADistillationTrainer(model=twin, args=args, teacher=teacher, soft=None, span=span, hard=hard)
    with torch.no_grad():
        expected, parts, _ = trainer.distillation_loss(twin, {k: v for k, v in batch.items() if k != "row"})
    assert float(terms["kl"]) == pytest.approx(float(parts["kl"]), abs=1e-6) and float(parts["kl"]) > 1e-3
    assert float(terms["hard_ce"]) == pytest.approx(float(parts["hard_ce"]), rel=1e-6)
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-6)


def test_raw_logit_terms_are_refused_for_a_qa_teacher(tmp_path, tasks, squad, bert_mlm_dir, capsys):  # noqa: F811
    path = _mixed_config(tmp_path, tasks, squad, qa={"teacher": bert_mlm_dir}, distill_weights={"out_mse": 1.0})
    with pytest.raises(SystemExit) as info:
        main(["--multitask", path, "--model", bert_mlm_dir, "--output_dir", str(tmp_path / "out"), *FAST])
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and "'out_mse' compares raw logits" in err[-1]
    assert not (tmp_path / "out").exists()


def _single_task_evaluation(model_dir, head_file, squad, tmp_path):
    """glue-eval's own QA evaluation (qa_finetune.evaluate_qa) of an AutoModelForQuestionAnswering made from the
    saved encoder folder and the span head's saved weights, read from the files."""
    from safetensors.torch import load_file
    from transformers import AutoModelForQuestionAnswering, AutoTokenizer, DataCollatorWithPadding, Trainer
    from transformers import TrainingArguments

    from glue_eval.arguments import GlueArguments
    from glue_eval.data import load_splits
    from glue_eval.encode import tokenize
    from glue_eval.qa_finetune import evaluate_qa
    from glue_eval.tasks import get_task

    model = AutoModelForQuestionAnswering.from_pretrained(str(model_dir)).eval()
    head = load_file(str(model_dir / head_file))
    model.qa_outputs.load_state_dict({k.removeprefix("qa_outputs."): v for k, v in head.items()})
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    task = get_task(str(squad / "years.json"))
    data = tokenize(task, load_splits(task, ["train", "validation"]), tokenizer, 48, 16)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], per_device_eval_batch_size=7)
    trainer = Trainer(model=model, args=args, data_collator=DataCollatorWithPadding(tokenizer))
    glue = GlueArguments(model=str(model_dir), doc_stride=16)
    return evaluate_qa(trainer, task, data, glue, str(tmp_path))


@pytest.mark.parametrize("extra", [{"schedule": "per_task", "sampling": "uniform"},
                                   {"schedule": "sum", "gradient": "pcgrad", "teacher": True}])
def test_a_qa_task_trains_beside_a_classification_task_and_scores_as_single_task_qa(
        tmp_path, tasks, squad, bert_mlm_dir, extra):  # noqa: F811
    from transformers import AutoModel, BertForQuestionAnswering

    extra = dict(extra)
    if extra.pop("teacher", False):  # a QA teacher: its span terms train the QA task
        torch.manual_seed(3)
        BertForQuestionAnswering(tiny.make_config("bert")).save_pretrained(str(tmp_path / "qa_teacher"))
        extra.update(qa={"teacher": str(tmp_path / "qa_teacher")}, distill_weights={"kl": 1.0, "hard_ce": 1.0})
    config = _mixed_config(tmp_path, tasks, squad, **extra)
    out = tmp_path / "out"
    assert main(["--multitask", config, "--model", bert_mlm_dir, "--output_dir", str(out), "--seed", "0",
                 "--max_steps", "6", *FAST]) == 0
    result = json.loads((out / "result.json").read_text())
    if "distill_weights" in extra:
        assert list(result["train"]["teachers"]) == ["years"]
        assert {"kl", "hard_ce"} <= set(result["train"]["logs"][-1]["terms"]["years"])
    years = result["tasks"]["years"]
    assert set(years["dev"]["validation"]) == {"exact_match", "f1"}
    assert years["score"] == pytest.approx(sum(years["dev"]["validation"].values()) / 2)
    assert result["settings"]["doc_stride"] == 16 and result["train"]["examples"]["years"] > 80  # windows
    steps = [e for e in result["train"]["logs"] if "years" in e["terms"]]
    assert steps and result["train"]["kinds"][extra["schedule"]] == 6
    manifest = json.loads((out / "model" / "multitask.json").read_text())
    (qa,) = [t for t in manifest["tasks"] if t["name"] == "years"]
    assert qa["kind"] == "extractive_qa" and qa["head"]["span"] is True
    single = _single_task_evaluation(out / "model", qa["weights"], squad, tmp_path / "single")
    assert single["dev"] == years["dev"] and single["score"] == pytest.approx(years["score"])
    ours = json.loads((out / "predictions" / "years_validation.json").read_text())
    assert ours == json.loads((tmp_path / "single" / "predictions_validation.json").read_text())
    assert len(ours) == 20 and any(ours.values())
    AutoModel.from_pretrained(str(out / "model"))  # the encoder alone, as ever
    loaded = load_multitask(str(out / "model"))
    assert loaded.tasks["years"]["kind"] == "extractive_qa"


@pytest.mark.slow
def test_one_encoder_learns_the_years_and_the_keyword_together(tmp_path, tasks, squad, bert_mlm_dir):  # noqa: F811
    config = _mixed_config(tmp_path, tasks, squad, schedule={"mode": "hybrid", "window": 3, "patience": 1,
                                                             "sum_every": 3})
    out = tmp_path / "out"
    assert main(["--multitask", config, "--model", bert_mlm_dir, "--output_dir", str(out), "--seed", "0",
                 "--num_train_epochs", "4", *FAST]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["tasks"]["city"]["dev"]["validation"]["accuracy"] > 0.8  # chance is 0.5
    assert result["tasks"]["years"]["dev"]["validation"]["f1"] > 0.5  # a year is a whole answer


def test_a_teacher_of_hard_ce_alone_records_no_cache(tmp_path, tasks, squad, bert_mlm_dir):  # noqa: F811
    """hard_ce reads only the gold spans: the teacher's span logits are not cached, and the record says 0 rows."""
    from transformers import AutoTokenizer, BertForQuestionAnswering, DataCollatorWithPadding, TrainingArguments

    from glue_eval.multitask.run import MultitaskArguments, attach_teachers

    teacher_dir = tmp_path / "qa_teacher"
    BertForQuestionAnswering(tiny.make_config("bert")).save_pretrained(str(teacher_dir))
    config = load_config(_mixed_config(tmp_path, tasks, squad, qa={"teacher": str(teacher_dir)},
                                       distill_weights={"hard_ce": 1.0}))
    tokenizer = AutoTokenizer.from_pretrained(bert_mlm_dir)
    run, _ = _qa_run(squad, tokenizer, config)
    model = build_multitask(bert_mlm_dir, config.tasks).eval()
    args = TrainingArguments(output_dir=str(tmp_path / "o"), use_cpu=True, report_to=[])
    record = attach_teachers([run], config, MultitaskArguments(model=bert_mlm_dir), args, model,
                             DataCollatorWithPadding(tokenizer))
    assert record["years"]["cached_rows"] == 0 and run.cache is None and run.soft is None
