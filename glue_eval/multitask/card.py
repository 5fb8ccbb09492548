"""The model card (README.md) of a multi-task model: the encoder, the tasks and their heads, the dev scores."""

from __future__ import annotations

import json


def model_card(tasks: dict, scores: dict, encoder: str, settings: dict) -> str:
    """tasks: name -> info (:func:`glue_eval.multitask.model.task_info`); scores: name -> {"score", "dev"}
    (fractions; the dev metrics per split); encoder: where the shared encoder came from; settings: the run's
    recipe (config, sampling, schedule, gradient, optimisation) as JSON-able values."""
    # feature-extraction: what transformers' own pipeline gets from this folder is the shared encoder (the heads
    # load with load_multitask); text-classification would build a classifier with a random head
    lines = ["---", "library_name: transformers", "pipeline_tag: feature-extraction",
             "tags: [multi-task, distillation]", "---", "",
             "# Multi-task student", "",
             f"One shared encoder (from `{encoder}`) and a head per task, trained together with "
             "`glue-eval --multitask`.", "",
             "| task | type | labels | head | dev metrics | score |", "|---|---|---|---|---|---|"]
    for name, info in tasks.items():
        kind = "regression" if info["num_labels"] == 1 else f"{info['num_labels']} classes"
        labels = ", ".join(info["labels"]) if info["labels"] else "score"
        head = info["head"].get("transformers") or _stack(info["head"])
        if info.get("kind") == "extractive_qa":
            kind = "extractive QA" + (" (v2: may have no answer)" if info.get("version_2") else "")
            labels = "answer spans"
        result = scores.get(name)
        metrics = "; ".join(" ".join(f"{m} {100 * v:.1f}" for m, v in split.items())
                            for split in result["dev"].values()) if result else "not evaluated"
        score = f"{100 * result['score']:.1f}" if result else ""
        lines.append(f"| {name} | {kind} | {labels} | {head} | {metrics} | {score} |")
    if scores:
        average = sum(s["score"] for s in scores.values()) / len(scores)
        lines.append(f"| **average** | | | | | **{100 * average:.1f}** |")
    lines += ["", "## Use", "", "```python",
              "from glue_eval.multitask.model import load_multitask",
              "from transformers import AutoModel, AutoTokenizer", "",
              "model = load_multitask(FOLDER)            # model(task=NAME, **inputs).logits",
              "tokenizer = AutoTokenizer.from_pretrained(FOLDER)",
              f"out = model(task={next(iter(tasks))!r}, **tokenizer(['a sentence'], return_tensors='pt'))",
              "encoder = AutoModel.from_pretrained(FOLDER)  # the shared encoder alone", "```", "",
              "Heads: `multitask.json` (tasks, labels, metrics, head specs) and `heads/*.safetensors`.", "",
              "## Training", "", "```json", json.dumps(settings, indent=2, default=str), "```", ""]
    return "\n".join(lines)


def _stack(head: dict) -> str:
    widths = head.get("layers") or []
    inner = " → ".join(f"linear {w} + {head.get('activation')}" for w in widths)
    if head.get("span"):
        return "every token → " + (inner + " → " if inner else "") + "linear 2 (start, end)"
    return f"{head.get('pooling', 'cls')} pooling → " + (inner + " → " if inner else "") + "linear"
