"""The model card of a distilled student: the init card's front matter plus the training recipe and results."""

from __future__ import annotations

import json

from distill import __version__
from distill.models.card import (
    card_metadata,
    front_matter,
    sentence_usage,
    teacher_label,
)
from distill.objective.terms import takes_temperature


def training_card(cfg, layers, objective, stats, steps, world, device, precision, student_class, data_desc,
                  auto_reason: str | None = None, machine: str | None = None, size: dict | None = None) -> str:
    """``auto_reason``: the line precision "auto" printed; ``machine``: hardware.describe_machine() of the run;
    ``size``: a student of chosen size (``layers`` None): ``distill.models.student.size_record``."""
    from distill.common.assets import resolve_model_name
    from distill.models.sentence import pipeline_source

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
        *([f"| other teachers | {', '.join(f'`{t}`' for t in cfg.other_teachers)}; weights "
           f"{cfg.teacher_weights or 'equal'} (the student was built from the first) |"] if cfg.other_teachers else []),
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
