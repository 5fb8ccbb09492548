"""The model card (README.md) written next to a distilled student."""

from __future__ import annotations

import json

from . import __version__
from .terms import takes_temperature


def training_card(cfg, layers, objective, stats, steps, world, device, precision, student_class, data_desc,
                  auto_reason: str | None = None, machine: str | None = None) -> str:
    """``auto_reason``: the line precision "auto" printed; ``machine``: hardware.describe_machine() of the run."""
    weights = {k: v for k, v in cfg.weights.items() if v}
    final = stats.last_terms or {}
    lines = [
        "---", "library_name: transformers", "tags: [distillation]", "---", "",
        f"# {len(layers)}-layer student distilled from `{cfg.teacher}`", "",
        f"Distilled with the `distill` toolkit {__version__}. The full recipe is in `distill_config.json`.", "",
        "| | |", "|---|---|",
        f"| teacher | `{cfg.teacher}` |",
        f"| student | {student_class}, {len(layers)} layers, initialised from teacher layers {','.join(map(str, layers))} (1-based) |",
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
        "Grade it on GLUE with `glue-eval --model <this folder> --task all --output_dir <out>`.", "",
    ]
    return "\n".join(lines)
