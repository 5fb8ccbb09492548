"""Real learning on a local task spec: a tiny model finds a keyword, and a student learns it from a teacher alone."""

import csv
import json
import random
import shutil
from pathlib import Path

import pytest
import torch

from distill.common.errors import UsageError
from glue_eval.cli import main
from glue_eval.distillation import parse_weights
from glue_eval.tasks import get_task
from tests import tiny

KEYWORD = "city"
TRAIN = ["--use_cpu", "--learning_rate", "3e-3", "--per_device_train_batch_size", "8", "--num_train_epochs", "3",
         "--warmup_steps", "0.1", "--disable_tqdm", "true"]


def _rows(n, rng):
    """Label 'yes' iff the keyword occurs; short texts of other words, the keyword anywhere."""
    words = [w for w in tiny.WORDS if w != KEYWORD]
    rows = []
    for i in range(n):
        text = [rng.choice(words) for _ in range(rng.randint(3, 6))]
        if i % 2:
            text.insert(rng.randint(0, len(text)), KEYWORD)
        rows.append((" ".join(text), "yes" if i % 2 else "no"))
    return rows


@pytest.fixture(scope="module")
def keyword_task(tmp_path_factory):
    folder = tmp_path_factory.mktemp("keyword")
    rng = random.Random(0)
    train, dev = _rows(160, rng), _rows(100, rng)
    with open(folder / "train.csv", "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([("text", "label"), *train])
    # The same texts with labels drawn at random: only a teacher can teach this set anything.
    with open(folder / "train_noise.csv", "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([("text", "label"), *[(t, rng.choice(["no", "yes"])) for t, _ in train]])
    with open(folder / "dev.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": t, "label": y}) + "\n" for t, y in dev)
    spec = {"name": "has_city", "train": "train.csv", "dev": "dev.jsonl", "text_columns": ["text"],
            "label_column": "label", "labels": ["no", "yes"], "metric": "accuracy"}
    (folder / "task.json").write_text(json.dumps(spec))
    (folder / "noise.json").write_text(json.dumps({**spec, "train": "train_noise.csv"}))
    return folder


def _result(out: Path) -> dict:
    (path,) = out.rglob("result.json")
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def teacher(keyword_task, bert_mlm_dir):
    out = keyword_task / "teacher_run"
    main(["--model", bert_mlm_dir, "--task", str(keyword_task / "task.json"), "--output_dir", str(out),
          "--seed", "0", "--save_model", *TRAIN])
    return out


@pytest.mark.slow
def test_a_tiny_model_learns_a_keyword_task_well_above_chance(teacher):
    record = _result(teacher)
    assert record["task"] == "has_city" and record["train"]["examples"] == 160
    assert record["dev"]["validation"]["accuracy"] > 0.8  # chance is 0.5 (balanced dev set)
    assert (teacher / "has_city" / record["cell"] / "model" / "config.json").is_file()


def test_a_finished_cell_is_kept_for_the_same_data_and_refused_for_other_data(teacher, keyword_task, bert_mlm_dir,
                                                                            tmp_path, capsys):
    # a copy of the task and of the finished run: same content under other paths
    task = tmp_path / "task"
    task.mkdir()
    for name in ("task.json", "noise.json", "train.csv", "train_noise.csv", "dev.jsonl"):
        shutil.copy(keyword_task / name, task / name)
    out = tmp_path / "run"
    shutil.copytree(teacher, out)
    (result,) = out.rglob("result.json")
    before = result.stat().st_mtime_ns
    argv = ["--model", bert_mlm_dir, "--output_dir", str(out), "--seed", "0", "--save_model", *TRAIN]
    assert main(["--task", str(task / "task.json"), *argv]) == 0
    assert result.stat().st_mtime_ns == before  # same spec, same files: nothing was redone

    def refused(spec):
        with pytest.raises(SystemExit) as info:
            main(["--task", str(spec), *argv])
        assert info.value.code == 2
        assert "other settings (task_data: " in capsys.readouterr().err
        assert result.stat().st_mtime_ns == before

    refused(task / "noise.json")  # the same task name over another train file
    lines = (task / "train.csv").read_text(encoding="utf-8").splitlines()
    (task / "train.csv").write_text("\n".join(lines[:-1]) + "\n", encoding="utf-8")
    refused(task / "task.json")  # the same file edited in place
    spec = json.loads((keyword_task / "task.json").read_text())
    shutil.copy(keyword_task / "train.csv", task / "train.csv")
    (task / "task.json").write_text(json.dumps({**spec, "labels": ["yes", "no"]}))
    refused(task / "task.json")  # the same files read with the labels the other way round


@pytest.mark.slow
def test_a_student_learns_from_the_teacher_alone_on_randomly_labelled_data(teacher, keyword_task, vocab_dir):
    student = tiny.save_model("bert_mlm", keyword_task / "student", vocab_dir, seed=1)
    teacher_model = next(teacher.rglob("model"))
    out = keyword_task / "distilled"
    main(["--model", student, "--task", str(keyword_task / "noise.json"), "--output_dir", str(out), "--seed", "0",
          "--teacher", str(teacher_model), "--distill_weights", '{"kl": 1.0}', "--temperature", "2", *TRAIN])
    record = _result(out)
    assert record["settings"]["distill_weights"] == {"kl": 1.0} and record["settings"]["temperature"] == 2.0
    # The train labels are noise, so what the student knows came through the kl term.
    assert record["dev"]["validation"]["accuracy"] > 0.8


def test_intermediate_terms_run_with_the_layer_map(teacher, keyword_task, bert_mlm_dir):
    out = keyword_task / "intermediate"
    weights = '{"kl": 1.0, "hard_ce": 1.0, "hid_mse": 1.0, "att_mse": 1.0}'
    main(["--model", bert_mlm_dir, "--task", str(keyword_task / "task.json"), "--output_dir", str(out),
          "--teacher", str(next(teacher.rglob("model"))), "--distill_weights", weights, "--student_layers", "1,2,3,4",
          "--use_cpu", "--max_steps", "2", "--logging_steps", "1", "--disable_tqdm", "true"])
    record = _result(out)
    assert record["settings"]["student_layers"] == "1,2,3,4"
    assert record["settings"]["distill_weights"] == json.loads(weights)


def _layer_map_terms(student_layers: str, vocab_dir):
    """glue-eval's own stage objective and trainer on one padded batch: (its terms, float64 by hand)."""
    from transformers import BertTokenizer, DataCollatorWithPadding, TrainingArguments

    from glue_eval.distillation import stage_objectives
    from glue_eval.arguments import GlueArguments
    from glue_eval.trainer import DistillationTrainer

    student, teacher = tiny.eager_classifier(1, 2), tiny.eager_classifier(2, 4)
    with torch.no_grad():  # teacher layer t's hidden states scaled by t, so each map reads visibly other targets
        for t, layer in enumerate(teacher.bert.encoder.layer, start=1):
            layer.output.LayerNorm.weight.mul_(t)
    tok = BertTokenizer.from_pretrained(vocab_dir)
    batch = DataCollatorWithPadding(tok)([tok(t) for t in ("the cat sat", "a dog ran far away from home", "yes")])
    batch["labels"] = torch.tensor([0, 1, 0])
    # the reference first: the trainer sets its teacher up to run eager attention on the mapped layers only
    with torch.no_grad():
        s_out = student(batch["input_ids"], batch["attention_mask"], output_hidden_states=True, output_attentions=True)
        t_out = teacher(batch["input_ids"], batch["attention_mask"], output_hidden_states=True, output_attentions=True)
    glue = GlueArguments(student_layers=student_layers)
    soft, _ = stage_objectives({"hid_mse": 1.0, "att_mse": 1.0}, glue, student, teacher)
    trainer = DistillationTrainer(model=student, args=TrainingArguments(output_dir=str(Path(vocab_dir) / "t"), use_cpu=True,
                                  report_to=[]), teacher=teacher, soft=soft, hard=None)
    _, terms, _ = trainer.distillation_loss(student, dict(batch))
    mask = batch["attention_mask"].double()
    pairs = [(i + 1, int(t)) for i, t in enumerate(student_layers.split(","))]  # student i <- teacher layer, 1-based
    hid = [(((s_out.hidden_states[s].double() - t_out.hidden_states[t].double()) ** 2).sum(-1) * mask).sum()
           / (mask.sum() * s_out.hidden_states[s].shape[-1]) for s, t in pairs]
    keep = mask[:, None, :, None] * mask[:, None, None, :]  # query and key both real, every head
    att = [(((s_out.attentions[s - 1].double() - t_out.attentions[t - 1].double()) ** 2) * keep).sum()
           / (keep.sum() * s_out.attentions[s - 1].shape[1]) for s, t in pairs]
    return terms, {"hid_mse": float(sum(hid) / len(hid)), "att_mse": float(sum(att) / len(att))}


@pytest.mark.parametrize("student_layers", ["2,4", "1,3"])
def test_the_task_stage_compares_the_layers_of_the_map(student_layers, vocab_dir):
    terms, expected = _layer_map_terms(student_layers, vocab_dir)
    for name, value in expected.items():
        assert float(terms[name]) == pytest.approx(value, rel=1e-5), name
    # another map reads other teacher layers: the values move with it, far beyond the tolerance above
    other, _ = _layer_map_terms("1,2", vocab_dir)
    assert abs(float(other["hid_mse"]) / expected["hid_mse"] - 1) > 0.1


def test_gradient_accumulation_keeps_the_loss_scale(keyword_task, bert_mlm_dir):
    losses = {}
    for batch, steps in ((8, 1), (4, 2)):  # the same 8 examples per update, in one batch or two
        out = keyword_task / f"ga{steps}"
        main(["--model", bert_mlm_dir, "--task", str(keyword_task / "task.json"), "--output_dir", str(out),
              "--use_cpu", "--max_steps", "1", "--per_device_train_batch_size", str(batch),
              "--gradient_accumulation_steps", str(steps), "--seed", "0", "--disable_tqdm", "true"])
        losses[steps] = _result(out)["train"]["loss"]
    # An untrained binary classifier's loss is about ln 2 either way; not twice that with two micro-batches.
    assert losses[2] == pytest.approx(losses[1], rel=0.2)


def test_distillation_settings_that_cannot_work_are_refused():
    with pytest.raises(UsageError, match="regression"):
        parse_weights('{"kl": 1.0}', get_task("stsb"))
    with pytest.raises(UsageError, match="not a task-distillation term"):
        parse_weights('{"mlm": 1.0}')
    with pytest.raises(UsageError, match="not JSON"):
        parse_weights("kl=1")


def test_a_teacher_with_another_label_set_is_refused(keyword_task, vocab_dir, capsys):
    from transformers import BertForSequenceClassification

    three_way = BertForSequenceClassification(tiny.make_config("bert_mlm", num_labels=3))
    three_way.save_pretrained(str(keyword_task / "mnli_teacher"))
    with pytest.raises(SystemExit) as info:
        main(["--model", tiny.save_model("bert_mlm", keyword_task / "s2", vocab_dir), "--task",
              str(keyword_task / "task.json"), "--output_dir", str(keyword_task / "refused"),
              "--teacher", str(keyword_task / "mnli_teacher"), *TRAIN])
    assert info.value.code == 2
    assert "has 3 outputs but has_city needs 2" in capsys.readouterr().err


def _glue_eval_imports() -> dict[str, set[str]]:
    """Module -> glue_eval modules it imports anywhere (top level, inside functions, under if)."""
    import ast

    folder = Path(__file__).resolve().parent.parent / "glue_eval"
    modules = {p.stem for p in folder.glob("*.py")}
    graph = {}
    for name in modules:
        edges = set()
        for node in ast.walk(ast.parse((folder / f"{name}.py").read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                if node.level == 1 and node.module:
                    edges.add(node.module.split(".")[0])
                elif node.level == 1:
                    edges |= {a.name for a in node.names}
                elif (node.module or "").startswith("glue_eval."):
                    edges.add(node.module.split(".")[1])
                elif node.module == "glue_eval":
                    edges |= {a.name for a in node.names}
            elif isinstance(node, ast.Import):
                edges |= {a.name.split(".")[1] for a in node.names if a.name.startswith("glue_eval.")}
        graph[name] = edges & modules - {name}
    return graph


def test_glue_eval_modules_import_each_other_without_cycles():
    graph = _glue_eval_imports()
    assert "metrics" not in graph["tasks"] or "tasks" not in graph["metrics"]
    assert graph["trainer"].isdisjoint({"finetune", "distillation"})  # both build on the trainer
    state = {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            assert state.get(nxt) != "open", f"import cycle: {' -> '.join([*path, node, nxt])}"
            if nxt not in state:
                visit(nxt, [*path, node])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    # the check sees imports inside functions too: finetune imports the trainer only where it trains
    assert "trainer" in graph["finetune"] and "finetune" in graph["grid"]
