"""The pipeline's second stage: the classifier to fine-tune, with the task's head, checked against the
tokenizer."""

from __future__ import annotations

from distill.common.errors import UsageError

from .tasks import Task


def load_classifier(path: str, task: Task, eager: bool = False):
    """``AutoModelForSequenceClassification`` with the task's head (a fresh head if the checkpoint has another).

    ``eager=True`` selects eager attention, the only kind that returns attention probabilities.
    """
    from transformers import AutoConfig, AutoModelForSequenceClassification

    labels = task.labels or ("score",)
    config = AutoConfig.from_pretrained(
        path, num_labels=task.num_labels, id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
        problem_type="regression" if task.is_regression else "single_label_classification",
    )
    # A model fine-tuned on another task (MNLI -> RTE) gets a new head rather than an error.
    kwargs = {"attn_implementation": "eager"} if eager else {}
    return AutoModelForSequenceClassification.from_pretrained(path, config=config, ignore_mismatched_sizes=True,
                                                              **kwargs)


def check_vocabulary(tokenizer, model, name: str) -> None:
    """Token ids past the embedding table fail deep inside torch; say which folder disagrees instead."""
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise UsageError(
            f"the tokenizer has {len(tokenizer)} tokens but {name!r} has {rows} embedding rows: "
            "use the tokenizer the model was trained with"
        )
