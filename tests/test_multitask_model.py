"""The multi-task model: heads computed by hand in float64 from the encoder's own outputs, the saved folder read
back by from_pretrained (the encoder) and load_multitask (everything), the card, nothing half-written."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from distill.common.errors import UsageError
from glue_eval.multitask import model as mt
from glue_eval.multitask.card import model_card
from glue_eval.multitask.config import TaskEntry, parse_head
from glue_eval.tasks import get_task
from tests import tiny


def _entries():
    return [TaskEntry(get_task("sst2"), parse_head("t", {"layers": [8], "activation": "tanh", "dropout": 0.0,
                                                         "pooling": "mean"})),
            TaskEntry(get_task("mnli"), parse_head("t", {"transformers": "RobertaClassificationHead",
                                                         "config": {"classifier_dropout": 0.0}})),
            TaskEntry(get_task("stsb"), parse_head("t", None))]


@pytest.fixture(scope="module")
def built(bert_mlm_dir):
    torch.manual_seed(0)
    return mt.build_multitask(bert_mlm_dir, _entries()).eval()


def _hidden(folder, ids, mask, types=None):
    from transformers import AutoModel

    encoder = AutoModel.from_pretrained(folder).eval()
    extra = {} if types is None else {"token_type_ids": types}
    with torch.no_grad():
        return encoder(input_ids=ids, attention_mask=mask, **extra).last_hidden_state.double()


def _linear(x, layer):
    return x @ layer.weight.detach().double().T + layer.bias.detach().double()


def test_each_head_is_its_hand_computation_on_the_encoders_own_outputs(built, bert_mlm_dir):
    ids, mask = tiny.random_batch(batch=3, seq=10)
    hidden = _hidden(bert_mlm_dir, ids, mask)  # the MLM student's encoder, loaded on its own
    with torch.no_grad():
        outs = {t: built(task=t, input_ids=ids, attention_mask=mask).logits.double() for t in ("sst2", "mnli", "stsb")}
    m = mask.double().unsqueeze(-1)
    pooled = (hidden * m).sum(1) / m.sum(1)  # mean over real tokens: padding never counts
    stack = built.heads["sst2"].layers
    expected = _linear(torch.tanh(_linear(pooled, stack[1])), stack[4])
    assert outs["sst2"].shape == (3, 2) and torch.allclose(outs["sst2"], expected, atol=1e-5)
    head = built.heads["mnli"].head
    expected = _linear(torch.tanh(_linear(hidden[:, 0], head.dense)), head.out_proj)  # RoBERTa's head, by hand
    assert outs["mnli"].shape == (3, 3) and torch.allclose(outs["mnli"], expected, atol=1e-5)
    expected = _linear(hidden[:, 0], built.heads["stsb"].layers[1])  # one linear layer on the first token
    assert outs["stsb"].shape == (3, 1) and torch.allclose(outs["stsb"], expected, atol=1e-5)


def test_the_loss_is_the_tasks_own(built):
    ids, mask = tiny.random_batch(batch=3, seq=10)
    with torch.no_grad():
        cls = built(task="mnli", input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 2, 1]))
        reg = built(task="stsb", input_ids=ids, attention_mask=mask, labels=torch.tensor([0.5, 4.0, 2.0]))
    z = cls.logits.double()
    ce = -(z.log_softmax(-1)[torch.arange(3), torch.tensor([0, 2, 1])]).mean()
    assert float(cls.loss) == pytest.approx(float(ce), abs=1e-6)
    mse = ((reg.logits.double()[:, 0] - torch.tensor([0.5, 4.0, 2.0], dtype=torch.float64)) ** 2).mean()
    assert float(reg.loss) == pytest.approx(float(mse), abs=1e-5)
    with pytest.raises(UsageError, match="task 'qqp' has no head here: this model's tasks are sst2, mnli, stsb"):
        built(task="qqp", input_ids=ids, attention_mask=mask)


def test_the_saved_folder_is_the_encoder_for_from_pretrained_and_the_whole_model_for_load_multitask(
        built, vocab_dir, tmp_path):
    from transformers import AutoModel, AutoTokenizer

    folder = tmp_path / "mt"
    card = model_card(built.tasks, {"sst2": {"score": 0.75, "dev": {"validation": {"accuracy": 0.75}}}},
                      "student", {"gradient": "sum"})
    mt.save_multitask(built, str(folder), AutoTokenizer.from_pretrained(vocab_dir), card=card)
    ids, mask = tiny.random_batch(batch=3, seq=10)
    with torch.no_grad():
        own = built.encode(ids, mask)
        alone = AutoModel.from_pretrained(str(folder)).eval()(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.equal(own, alone)
    loaded = mt.load_multitask(str(folder))
    assert list(loaded.tasks) == ["sst2", "mnli", "stsb"] and not loaded.training
    with torch.no_grad():
        for task in loaded.tasks:
            assert torch.equal(loaded(task=task, input_ids=ids, attention_mask=mask).logits,
                               built(task=task, input_ids=ids, attention_mask=mask).logits)
    manifest = json.loads((folder / "multitask.json").read_text())
    assert [t["name"] for t in manifest["tasks"]] == ["sst2", "mnli", "stsb"]
    assert manifest["tasks"][1]["labels"] == ["entailment", "neutral", "contradiction"]
    text = (folder / "README.md").read_text()
    assert "| sst2 | 2 classes | negative, positive | mean pooling → linear 8 + tanh → linear | accuracy 75.0 | 75.0 |" \
        in text and "| mnli | 3 classes |" in text and "RobertaClassificationHead" in text
    assert AutoTokenizer.from_pretrained(str(folder))("the city")["input_ids"] == \
        AutoTokenizer.from_pretrained(vocab_dir)("the city")["input_ids"]
    assert "MaskedLM" not in (folder / "config.json").read_text()  # the encoder alone, its MLM head dropped
    from huggingface_hub import ModelCard

    assert ModelCard.load(str(folder / "README.md")).data.pipeline_tag == "feature-extraction"


def test_a_failed_save_leaves_nothing_behind(built, tmp_path, monkeypatch):
    import safetensors.torch

    def broken(*_a, **_k):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError):
        mt.save_multitask(built, str(tmp_path / "mt"))
    assert list(tmp_path.iterdir()) == []


def test_a_distilbert_student_serves_as_the_encoder(distilbert_mlm_dir):
    torch.manual_seed(0)
    model = mt.build_multitask(distilbert_mlm_dir, _entries()[:1] + _entries()[2:]).eval()
    ids, mask = tiny.random_batch(batch=2, seq=8)
    types = torch.ones_like(ids)  # a BERT tokenizer's token types: DistilBERT takes none, so none are passed
    with torch.no_grad():
        out = model(task="stsb", input_ids=ids, attention_mask=mask, token_type_ids=types).logits.double()
    expected = _linear(_hidden(distilbert_mlm_dir, ids, mask)[:, 0], model.heads["stsb"].layers[1])
    assert np.allclose(out.numpy(), expected.numpy(), atol=1e-5)


def test_a_head_that_names_no_transformers_class_is_one_line(bert_mlm_dir):
    entry = TaskEntry(get_task("sst2"), parse_head("t", {"transformers": "RobertaClassificationHeed"}))
    with pytest.raises(UsageError) as info:
        mt.build_multitask(bert_mlm_dir, [entry])
    assert "head 'RobertaClassificationHeed' is not a transformers module class" in str(info.value)


def test_load_multitask_refuses_a_plain_model_folder(bert_mlm_dir):
    with pytest.raises(UsageError, match="holds no multitask.json"):
        mt.load_multitask(bert_mlm_dir)
    assert Path(bert_mlm_dir, "config.json").is_file()
