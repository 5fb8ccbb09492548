"""The model card (README.md) written next to a distilled student."""

from __future__ import annotations

import json
import os

from . import __version__
from .terms import takes_temperature

PIPELINE_TAGS = (  # (end of the student's class name, the Hub's pipeline tag)
    ("ForMaskedLM", "fill-mask"), ("ForSequenceClassification", "text-classification"),
    ("ForPreTraining", "feature-extraction"), ("Model", "feature-extraction"),
)
SENTENCE_TAGS = ["sentence-transformers", "feature-extraction", "sentence-similarity"]


def corpus_dataset(corpus: str | None) -> str | None:
    """The hub dataset id of a corpus spec (``wikitext:...``, ``hub:<id>[:<config>]``); None for local text."""
    if not corpus:
        return None
    if corpus.startswith("wikitext:"):
        from .data import WIKITEXT_HUB_ID

        return WIKITEXT_HUB_ID
    if corpus.startswith("hub:"):
        return corpus[4:].partition(":")[0] or None
    return None


def _teacher_card_fields(teacher_path: str) -> dict:
    """``language`` and ``license`` from the teacher's own card: the student's weights come from it."""
    import yaml

    card = os.path.join(teacher_path, "README.md")
    if not os.path.isfile(card):
        return {}
    with open(card, encoding="utf-8", errors="replace") as f:
        text = f.read()
    if not text.startswith("---"):
        return {}
    try:
        meta = yaml.safe_load(text.split("---", 2)[1]) or {}
    except yaml.YAMLError:
        return {}
    return {k: meta[k] for k in ("language", "license") if isinstance(meta, dict) and meta.get(k)}


def card_metadata(teacher: str, student_class: str, sentence: bool = False, corpus: str | None = None,
                  extra_tags=()) -> dict:
    """The Hub's card metadata for a student: base_model, library_name, tags, datasets, pipeline_tag.

    ``teacher`` is the name the user gave (hub id, folder or the offline alias): the real hub
    id is read from the teacher's own files (``assets.hub_id``); an unknown one is left out.
    """
    from .assets import hub_id, resolve_model_name

    family = student_class.split("For")[0].removesuffix("Model").lower()
    meta: dict = {}
    base = hub_id(teacher)
    if base:
        meta["base_model"] = base
    meta.update(_teacher_card_fields(resolve_model_name(teacher)))
    meta["library_name"] = "sentence-transformers" if sentence else "transformers"
    meta["tags"] = list(dict.fromkeys(["distillation", "knowledge-distillation", family, *extra_tags,
                                       *(SENTENCE_TAGS if sentence else [])]))
    dataset = corpus_dataset(corpus)
    if dataset:
        meta["datasets"] = [dataset]
    meta["pipeline_tag"] = ("sentence-similarity" if sentence else
                            next((tag for end, tag in PIPELINE_TAGS if student_class.endswith(end)), None))
    return {k: v for k, v in meta.items() if v is not None}


def front_matter(meta: dict) -> list[str]:
    """The card's YAML front matter, as lines (``---`` / YAML / ``---``)."""
    import yaml

    return ["---", *yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).rstrip("\n").splitlines(), "---"]


def teacher_label(teacher: str) -> str:
    """The teacher as a card names it: its hub id where known, else the name given."""
    from .assets import hub_id

    return hub_id(teacher) or teacher


def sentence_usage() -> list[str]:
    return ["```python", "from sentence_transformers import SentenceTransformer",
            'model = SentenceTransformer("<this folder>")', 'embeddings = model.encode(["A sentence."])', "```", ""]


def training_card(cfg, layers, objective, stats, steps, world, device, precision, student_class, data_desc,
                  auto_reason: str | None = None, machine: str | None = None, size: dict | None = None) -> str:
    """``auto_reason``: the line precision "auto" printed; ``machine``: hardware.describe_machine() of the run;
    ``size``: a student of chosen size (``layers`` None): ``distill.student.size_record``."""
    from .assets import resolve_model_name
    from .sentence_models import pipeline_source

    weights = {k: v for k, v in cfg.weights.items() if v}
    final = stats.last_terms or {}
    sentence = pipeline_source(resolve_model_name(cfg.teacher), cfg.student) is not None
    teacher = teacher_label(cfg.teacher)
    n_layers = size["num_layers"] if size else len(layers)
    init = (f"hidden size {size['hidden_size']}, {size['num_heads']} heads, feed-forward {size['intermediate_size']}; "
            f"initialised: {size['initialised']}" if size else
            f"initialised from teacher layers {','.join(map(str, layers))} (1-based)")
    lines = [
        *front_matter(card_metadata(cfg.teacher, student_class, sentence, cfg.corpus)), "",
        f"# {n_layers}-layer student distilled from `{teacher}`", "",
        f"Distilled with the `distill` toolkit {__version__}. The full recipe is in `distill_config.json`.", "",
        "| | |", "|---|---|",
        f"| teacher | `{teacher}`{f' (given as `{cfg.teacher}`)' if teacher != cfg.teacher else ''} |",
        f"| student | {student_class}, {n_layers} layers, {init} |",
        f"| objective | {' + '.join(f'{w:g}*{k}' for k, w in weights.items())} |",
        f"| terms and layer pairs (s = student layer, t = teacher layer) | `{objective.describe()}` |",
        *([f"| temperature | {cfg.temperature:g} (soft-target terms multiplied by T^2) |"]
          if takes_temperature(weights) else []),
        f"| data | `{cfg.corpus}`: {data_desc} of {cfg.block_size} tokens ({cfg.data_mode}) |",
        f"| steps | {steps} optimiser steps x {cfg.per_device_batch_size * cfg.gradient_accumulation_steps * world} "
        f"sequences x {cfg.block_size} tokens ({stats.tokens:,} real tokens seen) |",
        f"| optimiser | AdamW lr {cfg.learning_rate:g}, betas ({cfg.adam_beta1}, {cfg.adam_beta2}), eps {cfg.adam_epsilon:g}, "
        f"weight decay {cfg.weight_decay:g}, warm-up {cfg.warmup_ratio:g} then linear decay, clip {cfg.max_grad_norm:g} |",
        f"| precision | {precision}{'; ' + auto_reason.removeprefix('precision: ') if auto_reason else ''}; {stats.skipped} overflow steps skipped |",
        f"| hardware | {world} x {device}{': ' + machine if machine else ''} |",
        f"| final terms (mean of the last logging window) | {json.dumps({k: round(v, 5) for k, v in final.items()})} |",
        "",
        "Load it like any transformers model:", "",
        "```python", "from transformers import AutoModel, AutoTokenizer",
        'model = AutoModel.from_pretrained("<this folder>")', 'tokenizer = AutoTokenizer.from_pretrained("<this folder>")',
        "```", "",
        *(["It is a sentence-transformers model, with its teacher's pooling and normalisation:", "",
           *sentence_usage()] if sentence else []),
        "Grade it on GLUE with `glue-eval --model <this folder> --task all --output_dir <out>`.", "",
    ]
    return "\n".join(lines)
