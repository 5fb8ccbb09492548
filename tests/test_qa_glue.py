"""glue-eval on extractive QA, end to end on real text: SQuAD's files, out-of-domain files, v2, task distillation."""

import json
import random
from pathlib import Path

import pytest
import torch

from distill.common.errors import UsageError
from glue_eval.cli import main
from glue_eval.squad_metrics import squad_scores
from tests import qa_sets, tiny

FAST = ["--use_cpu", "--precision", "fp32", "--max_seq_length", "48", "--doc_stride", "16",
        "--per_device_train_batch_size", "16", "--disable_tqdm", "true", "--report_to", "none"]


@pytest.fixture(scope="module")
def paragraphs():
    return qa_sets.year_paragraphs()


def _record(out: Path) -> tuple[dict, Path]:
    (path,) = out.rglob("result.json")
    return json.loads(path.read_text()), path.parent


def _gold(path: Path) -> dict:
    return {qa["id"]: [a["text"] for a in qa["answers"]] for article in json.loads(path.read_text())["data"]
            for paragraph in article["paragraphs"] for qa in paragraph["qas"]}


def test_squad_files_and_an_out_of_domain_file_give_em_and_f1_per_set(tmp_path, paragraphs, bert_mlm_dir):
    data = qa_sets.write_squad(tmp_path / "squad", paragraphs[:24], paragraphs[24:32])
    ood = tmp_path / "other_domain.json"
    ood.write_text(json.dumps(qa_sets.squad_document(paragraphs[32:40], "ood")))
    assert main(["--model", bert_mlm_dir, "--task", "squad", "--data_dir", str(data), "--eval_files", str(ood),
                 "--output_dir", str(tmp_path / "out"), "--max_steps", "4", *FAST]) == 0
    record, cell = _record(tmp_path / "out")
    assert set(record["dev"]) == {"validation", "other_domain"}
    for split, gold in (("validation", data / "dev-v1.1.json"), ("other_domain", ood)):
        predictions = json.loads((cell / f"predictions_{split}.json").read_text())
        assert set(predictions) == set(_gold(gold))  # one prediction per question
        assert record["dev"][split] == pytest.approx(squad_scores(predictions, _gold(gold)))
        assert set(record["dev"][split]) == {"exact_match", "f1"}
    assert record["score"] == pytest.approx(sum(record["dev"]["validation"].values()) / 2)  # in-domain only
    assert record["settings"]["doc_stride"] == 16 and record["settings"]["task_data"]["kind"] == "extractive_qa"
    assert record["train"]["examples"] > 24  # windows, not questions


def test_a_v2_task_spec_scores_no_answer_questions(tmp_path, paragraphs, bert_mlm_dir):
    folder = tmp_path / "spec"
    folder.mkdir()
    (folder / "train.json").write_text(json.dumps(qa_sets.squad_document(paragraphs[:16], "t", no_answer_every=3)))
    (folder / "dev.json").write_text(json.dumps(qa_sets.squad_document(paragraphs[16:25], "d", no_answer_every=3)))
    spec = {"name": "years", "type": "extractive_qa", "train": "train.json", "dev": "dev.json", "version_2": True}
    (folder / "task.json").write_text(json.dumps(spec))
    # a threshold so low that the null answer always wins: every no-answer question right, every other wrong
    assert main(["--model", bert_mlm_dir, "--task", str(folder / "task.json"), "--output_dir", str(tmp_path / "out"),
                 "--max_steps", "2", "--null_score_diff_threshold=-1e9", *FAST]) == 0
    record, cell = _record(tmp_path / "out")
    scores = record["dev"]["validation"]
    assert scores["NoAns_exact"] == scores["NoAns_f1"] == 1.0
    assert scores["HasAns_exact"] == scores["HasAns_f1"] == 0.0
    assert scores["exact_match"] == pytest.approx(3 / 9)  # 3 of the 9 dev questions have no answer
    assert set(json.loads((cell / "predictions_validation.json").read_text()).values()) == {""}


def test_bad_qa_inputs_are_refused_in_one_line(tmp_path, paragraphs, bert_mlm_dir, capsys):
    data = qa_sets.write_squad(tmp_path / "squad", paragraphs[:4], paragraphs[4:6])
    (tmp_path / "empty").mkdir()
    unanswerable = qa_sets.write_squad(tmp_path / "v2-as-v1", paragraphs[:4], paragraphs[4:6], no_answer_every=2)
    cases = [
        (["--task", "squad", "--data_dir", str(unanswerable)], "2 questions of its train split have no answer"),
        (["--task", "squad", "--data_dir", str(data), "--eval_files", str(unanswerable / "dev-v1.1.json")],
         "have no answer, which SQuAD v1 cannot score"),
        (["--task", "squad", "--data_dir", str(tmp_path / "empty")], "missing SQuAD train file"),
        (["--task", "squad", "--data_dir", str(data), "--eval_files", str(tmp_path / "none.json")], "does not exist"),
        (["--task", "squad", "--data_dir", str(data), "--eval_strategy", "epoch"], "scored after training"),
        (["--task", "squad", "--data_dir", str(data), "--doc_stride", "48"], "--doc_stride 48"),
        (["--task", "squad", "--data_dir", str(data), "--length_groups", "3"], "--length_groups 3 is for sentence"),
        (["--task", "rte", "--eval_files", str(data / "dev-v1.1.json")], "for extractive QA tasks"),
    ]
    for extra, message in cases:
        with pytest.raises(SystemExit) as stop:
            main(["--model", bert_mlm_dir, "--output_dir", str(tmp_path / "out"), "--max_steps", "1", *FAST, *extra])
        err = capsys.readouterr().err.strip().splitlines()
        assert stop.value.code == 2 and message in err[-1], (extra, err)
    assert not (tmp_path / "out" / "squad").exists()


# --- task distillation: the loss against a float64 reference, and the whole stage ---------------------------


def _qa_model(seed, vocab_dir=None, folder=None):
    from transformers import BertForQuestionAnswering

    torch.manual_seed(seed)
    model = BertForQuestionAnswering(tiny.make_config("bert", hidden_dropout_prob=0.0,
                                                      attention_probs_dropout_prob=0.0))
    if folder is not None:
        model.save_pretrained(folder)
    return model


def _trainer(tmp_path, student, teacher, weights, temperature=2.0):
    from transformers import TrainingArguments

    from glue_eval.qa_distill import QADistillationTrainer, qa_stage_objectives

    class Settings:  # the glue-eval arguments the objective reads
        student_layers = None
        layer_map = None

    Settings.temperature = temperature
    inner, span, hard = qa_stage_objectives(weights, Settings, student, teacher)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    return QADistillationTrainer(model=student, args=args, teacher=teacher, soft=inner, span=span, hard=hard)


def _reference(student, teacher, batch, temperature):
    """T^2 * mean over windows of (KL_start + KL_end) / 2 and the mean of the two gold cross-entropies, in
    float64 over each window's real tokens only."""
    s_out = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    t_out = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    kl, ce = [], []
    for i in range(batch["input_ids"].shape[0]):
        real = batch["attention_mask"][i].bool()
        for zs, zt, gold in ((s_out.start_logits, t_out.start_logits, batch["start_positions"]),
                             (s_out.end_logits, t_out.end_logits, batch["end_positions"])):
            log_s = torch.log_softmax(zs[i][real].double() / temperature, -1)
            log_t = torch.log_softmax(zt[i][real].double() / temperature, -1)
            kl.append((log_t.exp() * (log_t - log_s)).sum() * temperature ** 2)
            ce.append(-torch.log_softmax(zs[i][real].double(), -1)[gold[i]])
    return torch.stack(kl).mean(), torch.stack(ce).mean()


def test_span_kl_and_hard_ce_equal_a_float64_reference_and_ignore_padding(tmp_path):
    student, teacher = _qa_model(0).eval(), _qa_model(1).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, tiny.VOCAB_SIZE, (3, 12), generator=g)
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, 7:] = 0
    mask[2, 4:] = 0
    ids[mask == 0] = 0
    batch = {"input_ids": ids, "attention_mask": mask, "start_positions": torch.tensor([3, 5, 1]),
             "end_positions": torch.tensor([4, 6, 3])}
    trainer = _trainer(tmp_path, student, teacher, {"kl": 2.0, "hard_ce": 0.5}, temperature=3.0)
    with torch.no_grad():
        total, parts, _ = trainer.distillation_loss(student, batch)
        kl, ce = _reference(student, teacher, batch, 3.0)
    # float32 against float64: a small KL is a difference of O(1) log-probabilities, so an absolute tolerance
    assert parts["kl"].item() == pytest.approx(kl.item(), abs=1e-6) and kl.item() > 1e-3
    assert parts["hard_ce"].item() == pytest.approx(ce.item(), rel=1e-6)
    assert total.item() == pytest.approx(2.0 * kl.item() + 0.5 * ce.item(), abs=1e-5)
    other = dict(batch, input_ids=torch.where(mask.bool(), ids, 7))  # other tokens in the padding
    with torch.no_grad():
        again, _, _ = trainer.distillation_loss(student, other)
    assert again.item() == pytest.approx(total.item(), rel=1e-6)


def test_the_cached_span_logits_are_the_teachers_own(tmp_path, vocab_dir):
    import datasets
    from transformers import AutoTokenizer, DataCollatorWithPadding

    from glue_eval.qa_distill import SpanLogitCache

    teacher = _qa_model(1).eval()
    tokenizer = AutoTokenizer.from_pretrained(vocab_dir)
    rows = tokenizer(["in what year", "the city"], ["the city was new in 1850 .", "a school of the state"])
    train = datasets.Dataset.from_dict(dict(rows))
    collate = DataCollatorWithPadding(tokenizer)
    cache = SpanLogitCache.build(teacher, train, collate, batch_size=1)
    batch = collate([train[i] for i in range(2)])
    cached = cache.features(torch.tensor([0, 1]), batch["attention_mask"]).logits
    with torch.no_grad():
        out = teacher(**batch)
    for i in range(2):
        real = batch["attention_mask"][i].bool()
        assert torch.allclose(cached[i, 0][real], out.start_logits[i][real], atol=1e-6)
        assert torch.allclose(cached[i, 1][real], out.end_logits[i][real], atol=1e-6)


def _noisy(paragraphs, prefix, seed):
    """Every question's answer replaced by a random stretch of its context: only a teacher can teach this set."""
    rng = random.Random(seed)
    document = qa_sets.squad_document(paragraphs, prefix)
    for article in document["data"]:
        paragraph = article["paragraphs"][0]
        start = rng.randrange(0, len(paragraph["context"]) - 10)
        paragraph["qas"][0]["answers"] = [{"text": paragraph["context"][start:start + 6], "answer_start": start}]
    return document


@pytest.mark.slow
def test_a_student_learns_the_answers_from_a_qa_teacher_alone(tmp_path, paragraphs, vocab_dir, bert_mlm_dir):
    """The wiring of task distillation on tiny data (no claim of size): a teacher fine-tuned on the years; a
    student trained on the same passages with random spans as answers learns nothing from them alone, and
    learns the years from the teacher's span distributions (kl only, the spans never read)."""
    data = qa_sets.write_squad(tmp_path / "squad", paragraphs[:80], paragraphs[80:110])
    train = ["--learning_rate", "3e-3", "--num_train_epochs", "3", *FAST]
    assert main(["--model", bert_mlm_dir, "--task", "squad", "--data_dir", str(data), "--save_model",
                 "--output_dir", str(tmp_path / "teacher"), *train]) == 0
    teacher, teacher_cell = _record(tmp_path / "teacher")
    assert teacher["dev"]["validation"]["f1"] > 0.5
    noisy = tmp_path / "noisy"
    noisy.mkdir()
    (noisy / "train-v1.1.json").write_text(json.dumps(_noisy(paragraphs[:80], "n", 0)))
    (noisy / "dev-v1.1.json").write_text((data / "dev-v1.1.json").read_text())
    student = tiny.save_model("bert_mlm", tmp_path / "student", vocab_dir, seed=3)
    assert main(["--model", student, "--task", "squad", "--data_dir", str(noisy),
                 "--output_dir", str(tmp_path / "alone"), *train]) == 0
    assert main(["--model", student, "--task", "squad", "--data_dir", str(noisy), "--teacher",
                 str(teacher_cell / "model"), "--distill_weights", '{"kl": 1}', "--temperature", "1",
                 "--output_dir", str(tmp_path / "distilled"), *train]) == 0
    alone, _ = _record(tmp_path / "alone")
    distilled, _ = _record(tmp_path / "distilled")
    stage = distilled["train"]["stages"][0]
    assert stage["teacher_forwards"] == 0 and distilled["train"]["teacher_cache"]["rows"] > 80  # from the cache
    assert any("distill/kl" in entry for entry in stage["logs"])
    assert alone["dev"]["validation"]["f1"] < 0.2
    assert distilled["dev"]["validation"]["f1"] > alone["dev"]["validation"]["f1"] + 0.3


def test_a_teacher_without_a_span_head_or_with_another_vocabulary_is_refused(tmp_path, paragraphs, bert_mlm_dir):
    from glue_eval.qa_distill import load_qa_teacher

    student = _qa_model(0)
    with pytest.raises(UsageError, match="has no trained span head"):
        load_qa_teacher(bert_mlm_dir, student, eager=False)
    other = tmp_path / "other"
    from transformers import BertForQuestionAnswering

    BertForQuestionAnswering(tiny.make_config("bert", vocab_size=tiny.VOCAB_SIZE + 7)).save_pretrained(other)
    with pytest.raises(UsageError, match="different vocabularies"):
        load_qa_teacher(str(other), student, eager=False)


@pytest.mark.slow
@pytest.mark.parametrize("script", ["distill_qa.sh", "distill_qa_multi.sh"])
def test_the_qa_recipe_scripts_run_with_tiny_models(script, tmp_path, paragraphs, vocab_dir, bert_mlm_dir):
    """The real scripts with the hub models swapped for tiny ones (a teacher per name, a student folder given)."""
    import os
    import subprocess

    data = qa_sets.write_squad(tmp_path / "squad", paragraphs[:12], paragraphs[12:16])
    student = tiny.save_model("bert_mlm", tmp_path / "student", vocab_dir, seed=3)
    other = tiny.save_model("bert_mlm", tmp_path / "other", vocab_dir, seed=4)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "STUDENT": student, "TEACHER": bert_mlm_dir,
           "TEACHERS": f"{bert_mlm_dir} {other}", "WEIGHTS": "3,1"}
    path = Path(__file__).parent.parent / "scripts" / script
    done = subprocess.run(["bash", str(path), str(tmp_path / "out"), "--data_dir", str(data), "--max_steps", "2",
                           "--use_cpu", "--precision", "fp32", "--max_seq_length", "48", "--doc_stride", "16",
                           "--report_to", "none", "--disable_tqdm", "true"],
                          capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    record, _ = _record(tmp_path / "out" / "distilled")
    settings = record["settings"]
    assert settings["distill_weights"] == {"kl": 0.5, "hard_ce": 0.5} and settings["temperature"] == 2.0
    assert settings["model"] == student and set(record["dev"]["validation"]) == {"exact_match", "f1"}
    if script == "distill_qa_multi.sh":
        assert [Path(t).parent.parent.parent.name for t in settings["teachers"]] == ["teacher0", "teacher1"]
        assert settings["teacher_weights"] == pytest.approx([0.75, 0.25])
    else:
        assert Path(settings["teacher"]).parts[-4:-2] == ("teacher", "squad")
        assert (tmp_path / "out" / "alone" / "results.jsonl").is_file()
