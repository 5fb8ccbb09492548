"""The family registry: every fact the toolkit knows about a model family, in one entry each.

A :class:`Family` names the transformers classes per role, the module paths inside a
layer (attention, query, key, value), the pooler, the prediction head, the tokenizer's
quirks and how a student of each supported family is initialised from it. Everything
else is derived from :data:`FAMILIES`: the supported (teacher, student) pairs, the
``--student-type`` choices, help and epilog texts, the head used by ``models.extract``.
No other module names a family; a new one is one entry here (plus its tests).

Classes are named, not imported, so that building a help text loads no model code.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from distill.common.errors import UsageError
from distill.models.layers import module_index

if TYPE_CHECKING:  # help texts read this module: keep torch and transformers out of its import
    import torch

ROLES = ("base", "mlm", "rtd")  # base model, masked-LM head, ELECTRA's replaced-token discriminator head

# student key (base-model relative) -> (description of the teacher source, fn(teacher_state) -> tensor)
Source = tuple[str, Callable[[dict], "torch.Tensor"]]


@dataclass(frozen=True)
class Tokens:
    """What a family's tokenizer and embeddings assume about token ids.

    cls/sep: the tokens that open and close a sequence (``[CLS]``/``[SEP]``, ``<s>``/``</s>``).
    token_types: how many segment ids the family's models embed (RoBERTa: one, so pairs are
        told apart by ``</s></s>`` alone and no ``token_type_ids`` are fed).
    positions_from_padding: position ids are computed from ``input_ids`` and start after
        ``padding_idx`` (RoBERTa: ``padding_idx + 1``); the tokenizer must pad with the model's
        ``pad_token_id`` or real tokens get the wrong positions.
    """

    cls: str = "[CLS]"
    sep: str = "[SEP]"
    token_types: int = 2
    positions_from_padding: bool = False

    def position_offset(self, config) -> int:
        """Position-embedding rows before the first real position (0, or padding_idx + 1)."""
        return config.pad_token_id + 1 if self.positions_from_padding else 0


@dataclass(frozen=True)
class StudentRule:
    """How a student of another family is built from this family's teacher.

    config: ``(teacher_config, n_layers) -> student config``.
    weights: ``(student key, layers) -> Source | None``; keys are base-model relative and
        ``layers`` are the 1-based teacher layers (student layer i <- ``layers[i]``).
    """

    config: Callable
    weights: Callable[[str, list[int]], Source | None]


@dataclass(frozen=True)
class VocabHead:
    """A masked-LM head that ends in one linear layer onto the vocabulary.

    ``transform(model, hidden)`` is everything before that layer; ``decoder`` is the layer's
    path from the model (``nn.Linear`` with ``weight [vocab, H']`` and a bias). Called as a head,
    it is ``decoder(transform(hidden))``, the model's own head; split, it lets the objective run
    the decoder chunk by chunk (:mod:`distill.models.vocab_head`).
    """

    transform: Callable
    decoder: str

    def decoder_of(self, model):
        module = model
        for part in self.decoder.split("."):
            module = getattr(module, part)
        return module

    def __call__(self, model, hidden):
        return self.decoder_of(model)(self.transform(model, hidden))


def _gelu(x):
    import torch.nn.functional as F

    return F.gelu(x)


@dataclass(frozen=True)
class Family:
    """One model family. Module paths are relative to the base model (``model.base_model``)
    or, for the per-layer paths, to one transformer layer."""

    name: str  # the config's model_type, and the --student-type choice
    classes: dict  # role -> transformers class name
    heads: dict  # role -> fn(model, hidden [..., H]) -> head output (a VocabHead for a vocabulary); all roles but "base"
    layers_path: str  # ModuleList of transformer layers
    self_attention_path: str  # inside a layer: the module whose ``dropout.p`` is attention dropout
    query_path: str  # inside a layer: the query projection
    key_path: str  # inside a layer: the key projection
    value_path: str  # inside a layer: the value projection (MiniLM's value relation)
    num_layers_field: str
    hidden_size_field: str
    num_heads_field: str
    intermediate_size_field: str = "intermediate_size"  # the feed-forward width (a student of chosen size)
    pooler_path: str | None = None  # the pooler of the base model; None: the family has none
    pooler_class: str | None = None  # "module:Class" that builds it from the config
    tokens: Tokens = field(default_factory=Tokens)
    architectures: dict = field(default_factory=dict)  # further checkpoint architectures -> role
    students: dict = field(default_factory=dict)  # student family name -> StudentRule (own family implied)
    note: str = ""  # one line for help texts: what makes this family's pair special

    def __post_init__(self):
        # an entry is checked once, when it is written, not when a run first needs the missing part
        unknown = set(self.classes) - set(ROLES)
        headless = [r for r in self.classes if r != "base" and r not in self.heads]
        if unknown or headless or "base" not in self.classes:
            raise ValueError(f"family {self.name!r}: roles must be among {ROLES}, include 'base', and every role "
                             f"but 'base' needs a head (unknown {sorted(unknown)}, headless {headless})")
        if (self.pooler_path is None) != (self.pooler_class is None):
            raise ValueError(f"family {self.name!r}: pooler_path and pooler_class go together")

    def cls(self, role: str):
        """The transformers class of ``role`` (imported on first use)."""
        import transformers

        return getattr(transformers, self.classes[role])

    def role_of_class(self, name: str) -> str | None:
        for role, cls_name in self.classes.items():
            if cls_name == name:
                return role
        return self.architectures.get(name)

    def build_pooler(self, config) -> "torch.nn.Module":
        module, name = self.pooler_class.split(":")
        return getattr(importlib.import_module(module), name)(config)

    def max_positions(self, config) -> int:
        """The longest sequence the position embeddings hold."""
        return config.max_position_embeddings - self.tokens.position_offset(config)


# --- weight maps ------------------------------------------------------------------------------

def same_family_source(family: Family, key: str, layers: list[int]) -> Source:
    """A student of the teacher's own family: every key as it is, layer i renumbered to layers[i]."""
    m = re.fullmatch(rf"({re.escape(family.layers_path)}\.)(\d+)\.(.*)", key)
    src = f"{m[1]}{module_index(layers[int(m[2])])}.{m[3]}" if m else key
    return src, lambda t: t[src]


_BERT_TO_DISTILBERT = [
    # (student key pattern, teacher key template); {j} is the teacher layer (0-based module index)
    (r"embeddings\.word_embeddings\.weight", "embeddings.word_embeddings.weight"),
    (r"embeddings\.LayerNorm\.(weight|bias)", "embeddings.LayerNorm.{0}"),
    (r"transformer\.layer\.(\d+)\.attention\.q_lin\.(weight|bias)", "encoder.layer.{j}.attention.self.query.{1}"),
    (r"transformer\.layer\.(\d+)\.attention\.k_lin\.(weight|bias)", "encoder.layer.{j}.attention.self.key.{1}"),
    (r"transformer\.layer\.(\d+)\.attention\.v_lin\.(weight|bias)", "encoder.layer.{j}.attention.self.value.{1}"),
    (r"transformer\.layer\.(\d+)\.attention\.out_lin\.(weight|bias)", "encoder.layer.{j}.attention.output.dense.{1}"),
    (r"transformer\.layer\.(\d+)\.sa_layer_norm\.(weight|bias)", "encoder.layer.{j}.attention.output.LayerNorm.{1}"),
    (r"transformer\.layer\.(\d+)\.ffn\.lin1\.(weight|bias)", "encoder.layer.{j}.intermediate.dense.{1}"),
    (r"transformer\.layer\.(\d+)\.ffn\.lin2\.(weight|bias)", "encoder.layer.{j}.output.dense.{1}"),
    (r"transformer\.layer\.(\d+)\.output_layer_norm\.(weight|bias)", "encoder.layer.{j}.output.LayerNorm.{1}"),
    (r"vocab_transform\.(weight|bias)", "cls.predictions.transform.dense.{0}"),
    (r"vocab_layer_norm\.(weight|bias)", "cls.predictions.transform.LayerNorm.{0}"),
    (r"vocab_projector\.bias", "cls.predictions.bias"),
]


def _bert_to_distilbert_source(key: str, layers: list[int]) -> Source | None:
    if key == "embeddings.position_embeddings.weight":
        # DistilBERT has no token types: fold type 0 into positions so single-segment inputs are unchanged
        desc = "embeddings.position_embeddings.weight + embeddings.token_type_embeddings.weight[0]"
        return desc, lambda t: t["embeddings.position_embeddings.weight"] + t["embeddings.token_type_embeddings.weight"][0]
    if key == "vocab_projector.weight":  # the teacher's decoder: its own matrix when untied, else the embeddings
        decoder = "cls.predictions.decoder.weight"
        return decoder, lambda t: t[decoder] if decoder in t else t["embeddings.word_embeddings.weight"]
    for pattern, template in _BERT_TO_DISTILBERT:
        m = re.fullmatch(pattern, key)
        if m:
            groups = m.groups()
            j = module_index(layers[int(groups[0])]) if "{j}" in template else None
            src = template.format(*groups, j=j)
            return src, lambda t, src=src: t[src]
    return None


def _bert_to_distilbert_config(c, n_layers: int):
    from transformers import DistilBertConfig


    if getattr(c, "position_embedding_type", "absolute") not in (None, "absolute"):
        raise UsageError(f"a BERT teacher with {c.position_embedding_type!r} position embeddings cannot become a DistilBERT student")
    if c.hidden_act not in ("gelu", "relu"):
        raise UsageError(f"teacher activation {c.hidden_act!r} has no DistilBERT equivalent (gelu or relu): use --student-type bert")
    if abs(c.layer_norm_eps - 1e-12) > 1e-15:
        raise UsageError(f"teacher layer_norm_eps={c.layer_norm_eps} but DistilBERT fixes 1e-12: use --student-type bert")
    return DistilBertConfig(
        vocab_size=c.vocab_size, max_position_embeddings=c.max_position_embeddings, sinusoidal_pos_embds=False,
        n_layers=n_layers, n_heads=c.num_attention_heads, dim=c.hidden_size, hidden_dim=c.intermediate_size,
        dropout=c.hidden_dropout_prob, attention_dropout=c.attention_probs_dropout_prob, activation=c.hidden_act,
        initializer_range=c.initializer_range, pad_token_id=c.pad_token_id,
        tie_word_embeddings=getattr(c, "tie_word_embeddings", True),
    )


_DISTILBERT_HEAD = VocabHead(lambda m, h: m.vocab_layer_norm(m.activation(m.vocab_transform(h))), "vocab_projector")
_ROBERTA_HEAD = VocabHead(lambda m, h: m.lm_head.layer_norm(_gelu(m.lm_head.dense(h))), "lm_head.decoder")


# BERT-style layers (BERT, RoBERTa, XLM-R, ELECTRA): the same paths inside a layer
_BERT_LAYER = dict(layers_path="encoder.layer", self_attention_path="attention.self",
                   query_path="attention.self.query", key_path="attention.self.key",
                   value_path="attention.self.value", num_layers_field="num_hidden_layers",
                   hidden_size_field="hidden_size", num_heads_field="num_attention_heads")
_ROBERTA_TOKENS = Tokens(cls="<s>", sep="</s>", token_types=1, positions_from_padding=True)

FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family(
        "bert", {"base": "BertModel", "mlm": "BertForMaskedLM"},
        {"mlm": VocabHead(lambda m, h: m.cls.predictions.transform(h), "cls.predictions.decoder")},
        pooler_path="pooler", pooler_class="transformers.models.bert.modeling_bert:BertPooler",
        # BertForPreTraining checkpoints (bert-base-uncased's kind) carry the MLM head under the same names
        architectures={"BertForPreTraining": "mlm"},
        students={"distilbert": StudentRule(_bert_to_distilbert_config, _bert_to_distilbert_source)},
        note="a BERT teacher also gives a DistilBERT student (token type 0 folded into the positions)",
        **_BERT_LAYER,
    ),
    Family(
        "distilbert", {"base": "DistilBertModel", "mlm": "DistilBertForMaskedLM"}, {"mlm": _DISTILBERT_HEAD},
        layers_path="transformer.layer", self_attention_path="attention", query_path="attention.q_lin",
        key_path="attention.k_lin", value_path="attention.v_lin", num_layers_field="n_layers",
        hidden_size_field="dim", num_heads_field="n_heads", intermediate_size_field="hidden_dim",
    ),
    Family(
        "roberta", {"base": "RobertaModel", "mlm": "RobertaForMaskedLM"}, {"mlm": _ROBERTA_HEAD},
        pooler_path="pooler", pooler_class="transformers.models.roberta.modeling_roberta:RobertaPooler",
        tokens=_ROBERTA_TOKENS, **_BERT_LAYER,
    ),
    Family(
        "xlm-roberta", {"base": "XLMRobertaModel", "mlm": "XLMRobertaForMaskedLM"}, {"mlm": _ROBERTA_HEAD},
        pooler_path="pooler", pooler_class="transformers.models.xlm_roberta.modeling_xlm_roberta:XLMRobertaPooler",
        tokens=_ROBERTA_TOKENS, **_BERT_LAYER,
    ),
    Family(
        # MPNet's layers hold no position terms: one relative-position bias table in the encoder
        # (encoder.relative_attention_bias) serves every layer, so a student copies it under its own name
        "mpnet", {"base": "MPNetModel", "mlm": "MPNetForMaskedLM"}, {"mlm": _ROBERTA_HEAD},  # RoBERTa's head layout
        layers_path="encoder.layer", self_attention_path="attention.attn", query_path="attention.attn.q",
        key_path="attention.attn.k", value_path="attention.attn.v", num_layers_field="num_hidden_layers",
        hidden_size_field="hidden_size", num_heads_field="num_attention_heads",
        pooler_path="pooler", pooler_class="transformers.models.mpnet.modeling_mpnet:MPNetPooler",
        tokens=_ROBERTA_TOKENS,  # <s> ... </s>, no token types, positions counted past padding_idx
        note="an MPNet teacher's relative-position bias, shared by all its layers, is kept by its student",
    ),
    Family(
        "electra", {"base": "ElectraModel", "mlm": "ElectraForMaskedLM", "rtd": "ElectraForPreTraining"},
        {"mlm": VocabHead(lambda m, h: m.generator_predictions(h), "generator_lm_head"),
         "rtd": lambda m, h: m.discriminator_predictions(h)},
        note="an ELECTRA teacher gives a discriminator or a generator student, as it is itself",
        **_BERT_LAYER,
    ),
)}


# --- derived facts ----------------------------------------------------------------------------

def student_rule(teacher: str, student: str) -> StudentRule | None:
    """How a ``student`` family is built from a ``teacher`` family; None when the pair is unsupported."""
    family = FAMILIES[teacher]
    if student == teacher:
        return StudentRule(None, lambda key, layers: same_family_source(family, key, layers))
    return family.students.get(student)


def student_types() -> tuple[str, ...]:
    """Every family a student can be (read at call time: an entry added later counts)."""
    return tuple(FAMILIES)


def supported_pairs() -> frozenset:
    """(teacher family, student family): each family to itself, and each entry's extra students."""
    return frozenset({(name, name) for name in FAMILIES}
                     | {(name, s) for name, f in FAMILIES.items() for s in f.students})


STUDENT_TYPES: tuple[str, ...] = student_types()  # as registered at import (for choices and help texts)
SUPPORTED_PAIRS: frozenset = supported_pairs()


def pairs_text() -> str:
    """``bert->bert, bert->distilbert, ...`` for help and error texts."""
    return ", ".join(f"{a}->{b}" for a, b in sorted(supported_pairs()))


def family_notes() -> list[str]:
    return [f.note for f in FAMILIES.values() if f.note]


def role_from_architecture(arch: str) -> str:
    """The role of a checkpoint architecture name ("BertForPreTraining" -> "mlm"); unknown heads -> "base"."""
    for family in FAMILIES.values():
        role = family.role_of_class(arch)
        if role is not None:
            return role
    return "mlm" if arch.endswith("ForMaskedLM") else "base"


__all__ = ["FAMILIES", "Family", "ROLES", "STUDENT_TYPES", "SUPPORTED_PAIRS", "StudentRule", "Tokens",
           "family_notes", "pairs_text", "role_from_architecture", "student_rule", "student_types",
           "supported_pairs"]


# --- looking a model up (configs and models alike; no model code) ---------------------------------

def family_of(config_or_model) -> Family:
    """The :class:`Family` of a config or model; a clear error for unsupported model types."""
    config = getattr(config_or_model, "config", config_or_model)
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise UsageError(
            f"model type {model_type!r} is not supported: supported families are {', '.join(FAMILIES)}"
        )
    return FAMILIES[model_type]


def max_positions(config_or_model) -> int:
    """The longest sequence the model's position embeddings hold (RoBERTa: 2 rows fewer than the table)."""
    config = getattr(config_or_model, "config", config_or_model)
    return family_of(config).max_positions(config)


def get_path(module, path: str):
    """The submodule at dotted ``path`` (e.g. a family's ``layers_path``) of ``module``."""
    for part in path.split("."):
        module = getattr(module, part)
    return module


def transformer_layers(model):
    """The model's list of transformer layers, where its family keeps it."""
    return get_path(model.base_model, family_of(model).layers_path)
