"""Tiny random models and a small WordPiece tokenizer, built in the tests (no hub)."""

from __future__ import annotations

import string
from pathlib import Path

import torch

WORDS = (
    "the of and to in a is was for on as with by he at from his an were are which this be or has "
    "had not but first one their its new after who they have her she two been other when there all "
    "during into school time may years more most only over city some world would where later up "
    "such used many can state about national out known university united then made"
).split()


def vocab_tokens() -> list[str]:
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = list(string.ascii_lowercase + string.digits + ".,;:'\"!?()-")
    pieces = ["##" + c for c in string.ascii_lowercase + string.digits]
    return list(dict.fromkeys(specials + chars + pieces + WORDS))  # "a" is a letter and a word: one id


def save_tokenizer(folder) -> str:
    from transformers import BertTokenizer

    folder = Path(folder)
    (folder / "vocab.txt").write_text("\n".join(vocab_tokens()) + "\n")
    tok = BertTokenizer.from_pretrained(str(folder), model_max_length=64)
    tok.save_pretrained(str(folder))
    return str(folder)


VOCAB_SIZE = len(vocab_tokens())


def make_config(kind: str, **overrides):
    from transformers import BertConfig, DistilBertConfig, ElectraConfig

    common = dict(vocab_size=VOCAB_SIZE, max_position_embeddings=64, pad_token_id=0)
    if kind.startswith("bert"):
        cfg = BertConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64,
                         hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, **common)
    elif kind.startswith("distilbert"):
        cfg = DistilBertConfig(dim=32, n_layers=4, n_heads=4, hidden_dim=64, dropout=0.1,
                               attention_dropout=0.1, **common)
    elif kind == "electra_disc":
        cfg = ElectraConfig(embedding_size=16, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                            intermediate_size=64, **common)
    elif kind == "electra_gen":
        cfg = ElectraConfig(embedding_size=16, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=32, **common)
    else:
        raise ValueError(kind)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def build_model(kind: str, seed: int = 0, **overrides):
    """A tiny random model of ``kind``; non-trivial LayerNorm and bias values so copies are checkable."""
    from transformers import (
        BertForMaskedLM,
        BertModel,
        DistilBertForMaskedLM,
        ElectraForMaskedLM,
        ElectraForPreTraining,
    )

    cls = {"bert_mlm": BertForMaskedLM, "bert_base": BertModel, "distilbert_mlm": DistilBertForMaskedLM,
           "electra_disc": ElectraForPreTraining, "electra_gen": ElectraForMaskedLM}[kind]
    torch.manual_seed(seed)
    model = cls(make_config(kind, **overrides))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "LayerNorm" in name or "layer_norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def save_model(kind: str, folder, tokenizer_dir: str | None = None, seed: int = 0, **overrides) -> str:
    model = build_model(kind, seed=seed, **overrides)
    model.save_pretrained(str(folder))
    if tokenizer_dir:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(str(folder))
    return str(folder)


def random_batch(batch: int = 3, seq: int = 12, seed: int = 0, pad_last: int = 4, *, vocab_size: int = VOCAB_SIZE,
                 first_id: int = 5, cls: int = 2, sep: int = 3, pad: int = 0):
    """Token ids ``[CLS] ... [SEP]`` (ids ``cls``/``sep``, others drawn from ``first_id..vocab_size-1``) and right
    padding (``pad``) on every row but the first."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(first_id, vocab_size, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    ids[:, 0] = cls
    for row in range(batch):
        length = seq - (pad_last * row // max(batch - 1, 1))
        ids[row, length - 1] = sep
        ids[row, length:] = pad
        mask[row, length:] = 0
    return ids, mask


def cli_args(values: dict) -> list[str]:
    """``{"max_steps": 3, "weights": {...}}`` -> ``["--max_steps", "3", "--weights", '{...}']``."""
    import json

    args = []
    for k, v in values.items():
        args += [f"--{k}", json.dumps(v) if isinstance(v, (dict, list, bool)) else str(v)]
    return args


def saved_weights(folder) -> dict:
    """The tensors of ``folder/model.safetensors``."""
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / "model.safetensors"))


def kill_after_checkpoint(values: dict, checkpoint_step: int, timeout: float = 240.0) -> None:
    """Run ``distill-train`` with ``values`` and SIGKILL it as soon as checkpoint ``checkpoint_step`` exists.

    Asserts that the kill landed mid-run: the checkpoint is there and the final student is not.
    """
    import os
    import shutil
    import signal
    import subprocess
    import time

    out = Path(values["output_dir"])
    proc = subprocess.Popen([shutil.which("distill-train")] + cli_args(values), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    first = out / "checkpoints" / f"step-{checkpoint_step:08d}"  # a folder, renamed into place whole
    deadline = time.time() + timeout
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert first.exists() and proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    assert not (out / "model.safetensors").exists(), "the run ended before it was killed"


# --- RoBERTa / XLM-R: a byte-level BPE tokenizer trained here, and tiny models over it ---------

BPE_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # RoBERTa's order: <s>=0, <pad>=1, </s>=2


def save_bpe_tokenizer(folder, vocab_size: int = 400) -> str:
    """Train a byte-level BPE (the RoBERTa kind) on sentences of :data:`WORDS`; save it as a RobertaTokenizer."""
    import random

    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaTokenizer

    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(12)) + " ." for _ in range(400)]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(lines, vocab_size=vocab_size, min_frequency=2, special_tokens=BPE_SPECIALS)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    bpe.save_model(str(folder))  # vocab.json + merges.txt
    tok = RobertaTokenizer.from_pretrained(str(folder), model_max_length=64)
    tok.save_pretrained(str(folder))
    return str(folder)


def build_roberta(kind: str, vocab_size: int, seed: int = 0, **overrides):
    """``roberta_mlm``, ``roberta_base``, ``xlmr_mlm`` or ``xlmr_base``: tiny, random, with RoBERTa's
    conventions (pad id 1, positions counted from padding_idx + 1, one token type)."""
    from transformers import (
        RobertaConfig,
        RobertaForMaskedLM,
        RobertaModel,
        XLMRobertaConfig,
        XLMRobertaForMaskedLM,
        XLMRobertaModel,
    )

    config_cls = XLMRobertaConfig if kind.startswith("xlmr") else RobertaConfig
    cls = {"roberta_mlm": RobertaForMaskedLM, "roberta_base": RobertaModel, "xlmr_mlm": XLMRobertaForMaskedLM,
           "xlmr_base": XLMRobertaModel}[kind]
    cfg = config_cls(vocab_size=vocab_size, max_position_embeddings=64 + 2, pad_token_id=1, bos_token_id=0,
                     eos_token_id=2, type_vocab_size=1, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                     intermediate_size=64, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    torch.manual_seed(seed)
    model = cls(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "LayerNorm" in name or "layer_norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def save_roberta(kind: str, folder, tokenizer_dir: str, seed: int = 0, **overrides) -> str:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    build_roberta(kind, len(tok), seed=seed, **overrides).save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return str(folder)


def roberta_batch(vocab_size: int, batch: int = 3, seq: int = 12, seed: int = 0, pad_last: int = 4):
    """Token ids ``<s> ... </s>`` and right padding with ``<pad>`` (id 1) on every row but the first."""
    return random_batch(batch, seq, seed, pad_last, vocab_size=vocab_size, first_id=len(BPE_SPECIALS), cls=0, sep=2,
                        pad=1)


# --- BERT checkpoints that hold a pooler beside their head -------------------------------------

def save_bert_with_pooler(kind: str, folder, tokenizer_dir: str | None = None, seed: int = 0) -> str:
    """``bert_pretraining`` (BertForPreTraining: MLM + NSP heads, pooler) or ``bert_mlm_pooled`` (a
    BertForMaskedLM checkpoint that still holds ``bert.pooler.*``, as bert-base-uncased's does)."""
    from transformers import BertForPreTraining
    from transformers.models.bert.modeling_bert import BertPooler

    if kind == "bert_pretraining":
        torch.manual_seed(seed)
        model = BertForPreTraining(make_config("bert"))
    elif kind == "bert_mlm_pooled":
        model = build_model("bert_mlm", seed=seed)
        torch.manual_seed(seed + 1)
        model.bert.pooler = BertPooler(model.config)  # saved under bert.pooler.*; the class itself drops it
    else:
        raise ValueError(kind)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "pooler" in name or name.endswith("bias") or "LayerNorm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(str(folder))
    if tokenizer_dir:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(str(folder))
    return str(folder)


def bench_module(name: str):
    """A module of the ``bench`` package (``peers``, ``study``, ``prepare_study_data``), as ``python -m bench.NAME``
    imports it."""
    import importlib

    return importlib.import_module(f"bench.{name}")


# --- MPNet: RoBERTa's special tokens over a WordPiece vocabulary, a relative-position bias in the encoder ---

MPNET_SPECIALS = ["<s>", "<pad>", "</s>", "[UNK]"]  # all-mpnet-base-v2's first ids; <mask> is the last one


def save_mpnet_tokenizer(folder) -> str:
    """An MPNetTokenizer over :func:`vocab_tokens` (BERT's specials replaced by MPNet's)."""
    from transformers import MPNetTokenizer

    tokens = MPNET_SPECIALS + [t for t in vocab_tokens() if not t.startswith("[")] + ["<mask>"]
    tok = MPNetTokenizer(vocab={t: i for i, t in enumerate(tokens)}, model_max_length=64)
    Path(folder).mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(folder))
    return str(folder)


def build_mpnet(kind: str, vocab_size: int, seed: int = 0, **overrides):
    """``mpnet_mlm`` or ``mpnet_base``: tiny, random, with MPNet's conventions (pad id 1, positions counted
    from padding_idx + 1, no token types, one relative-position bias table shared by every layer)."""
    from transformers import MPNetConfig, MPNetForMaskedLM, MPNetModel

    cfg = MPNetConfig(vocab_size=vocab_size, max_position_embeddings=64 + 2, pad_token_id=1, bos_token_id=0,
                      eos_token_id=2, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64,
                      hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    torch.manual_seed(seed)
    model = {"mpnet_mlm": MPNetForMaskedLM, "mpnet_base": MPNetModel}[kind](cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "LayerNorm" in name or "layer_norm" in name:
                p.add_(0.1 * torch.randn_like(p))
            if "relative_attention_bias" in name:  # large enough that a lost or wrong table shows
                p.copy_(torch.randn_like(p))
    return model


def save_mpnet(kind: str, folder, tokenizer_dir: str, seed: int = 0, **overrides) -> str:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    build_mpnet(kind, len(tok), seed=seed, **overrides).save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return str(folder)


def mpnet_batch(vocab_size: int, batch: int = 3, seq: int = 12, seed: int = 0, pad_last: int = 4):
    """Token ids ``<s> ... </s>`` and right padding with ``<pad>`` (id 1) on every row but the first."""
    return random_batch(batch, seq, seed, pad_last, vocab_size=vocab_size - 1, first_id=len(MPNET_SPECIALS), cls=0,
                        sep=2, pad=1)


def eager_classifier(seed: int, layers: int):
    """A tiny BertForSequenceClassification (2 labels) of ``layers`` layers, eager attention, no dropout, in
    eval mode: a student or teacher whose features are exact to compare."""
    import torch
    from transformers import BertForSequenceClassification

    torch.manual_seed(seed)
    config = make_config("bert_mlm", num_labels=2, num_hidden_layers=layers, hidden_dropout_prob=0.0,
                         attention_probs_dropout_prob=0.0)
    config._attn_implementation = "eager"
    return BertForSequenceClassification(config).eval()
