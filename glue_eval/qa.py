"""Extractive QA's encode and decode: questions and contexts as overlapping windows, and windows' span logits
back to answer texts.

Encode (as transformers' run_qa example does): the question and the context go through the tokenizer as a pair,
the context cut into windows of ``max_seq_length`` tokens that overlap by ``doc_stride`` tokens, and the
tokenizer's own offset mapping ties every context token to its characters; so any family with a fast
tokenizer works (WordPiece, byte-level BPE, SentencePiece), whichever side it pads on. A training window
points at its answer's first and last tokens, or at its classifier token when the answer is not wholly inside
it (and for a v2 question without an answer).

Decode: for every example, over all of its windows, the ``n_best_size`` highest start and end logits pair into
candidate spans of context tokens (end not before start, at most ``max_answer_length`` tokens); the best sum of
start and end logit wins. For SQuAD v2 the null score is the classifier token's start + end logit (the smallest
over the windows); the answer is empty when the null score beats the best span by more than
``null_score_diff_threshold``.
"""

from __future__ import annotations

import numpy as np

from distill.common.errors import UsageError

from .tasks import Task

MODEL_COLUMNS = ("input_ids", "attention_mask", "token_type_ids")


def check_fast_tokenizer(tokenizer) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise UsageError(f"extractive QA needs a fast tokenizer (its offset mapping ties tokens to characters); "
                         f"{type(tokenizer).__name__} is not one: save the model's tokenizer.json, or pass --tokenizer")


def window_collator(tokenizer):
    """The collator of QA windows: padding after each window's tokens whatever side the tokenizer pads, so the
    span labels and offsets (token positions) stay where they point; the tokenizer itself is left as it is."""
    import copy

    from transformers import DataCollatorWithPadding

    if tokenizer.padding_side != "right":
        tokenizer = copy.copy(tokenizer)
        tokenizer.padding_side = "right"
    return DataCollatorWithPadding(tokenizer)


def _windows(tokenizer, questions, contexts, max_seq_length: int, doc_stride: int):
    question_first = tokenizer.padding_side == "right"  # the context goes on the side that gets padded
    pair = (questions, contexts) if question_first else (contexts, questions)
    try:
        return tokenizer(*pair, truncation="only_second" if question_first else "only_first",
                         max_length=max_seq_length, stride=doc_stride, return_overflowing_tokens=True,
                         return_offsets_mapping=True), int(question_first)
    except Exception as err:  # noqa: BLE001 - the tokenizer's own words for a question or stride too long
        raise UsageError(f"could not cut the contexts into windows of {max_seq_length} tokens with --doc_stride "
                         f"{doc_stride}: {str(err).splitlines()[0]} (give a larger --max_seq_length or a smaller "
                         "--doc_stride)") from None


def _cls_index(ids, tokenizer) -> int:
    cls = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
    return ids.index(cls) if cls in ids else 0


def span_positions(offsets, sequence_ids, context_id: int, start_char: int, end_char: int) -> tuple[int, int] | None:
    """The first and last token of characters ``[start_char, end_char)`` in one window, or None when the span
    is not wholly inside the window's context tokens."""
    tokens = [i for i, s in enumerate(sequence_ids) if s == context_id]
    if not tokens or offsets[tokens[0]][0] > start_char or offsets[tokens[-1]][1] < end_char:
        return None
    start = max(i for i in tokens if offsets[i][0] <= start_char)
    end = min(i for i in tokens if offsets[i][1] >= end_char)
    return start, end


def encode_train(examples, tokenizer, max_seq_length: int, doc_stride: int):
    """Training windows: the model's inputs with ``start_positions``/``end_positions`` (the classifier token
    where the window holds no whole answer; the first gold answer is the target, as in run_qa)."""

    def encode(batch):
        enc, context_id = _windows(tokenizer, [q.lstrip() for q in batch["question"]], batch["context"],
                                   max_seq_length, doc_stride)
        starts, ends = [], []
        for i, offsets in enumerate(enc["offset_mapping"]):
            answers = batch["answers"][enc["overflow_to_sample_mapping"][i]]
            span = None
            if answers["answer_start"]:
                start_char = answers["answer_start"][0]
                span = span_positions(offsets, enc.sequence_ids(i), context_id, start_char,
                                      start_char + len(answers["text"][0]))
            cls = _cls_index(enc["input_ids"][i], tokenizer)
            starts.append(span[0] if span else cls)
            ends.append(span[1] if span else cls)
        out = {k: enc[k] for k in MODEL_COLUMNS if k in enc}
        return {**out, "start_positions": starts, "end_positions": ends}

    return examples.map(encode, batched=True, remove_columns=examples.column_names, desc="QA training windows")


def encode_eval(examples, tokenizer, max_seq_length: int, doc_stride: int):
    """Evaluation windows: the model's inputs, ``example`` (the example's row), ``offsets`` (``[start, end)``
    characters of context tokens, ``[-1, -1]`` elsewhere) and ``cls_index``."""

    def encode(batch):
        enc, context_id = _windows(tokenizer, [q.lstrip() for q in batch["question"]], batch["context"],
                                   max_seq_length, doc_stride)
        offsets = [[list(o) if s == context_id else [-1, -1] for o, s in zip(enc["offset_mapping"][i], enc.sequence_ids(i))]
                   for i in range(len(enc["input_ids"]))]
        out = {k: enc[k] for k in MODEL_COLUMNS if k in enc}
        return {**out, "example": [batch["idx"][j] for j in enc["overflow_to_sample_mapping"]], "offsets": offsets,
                "cls_index": [_cls_index(ids, tokenizer) for ids in enc["input_ids"]]}

    return examples.map(encode, batched=True, remove_columns=examples.column_names, desc="QA evaluation windows")


def encode_splits(task: Task, splits: dict, tokenizer, max_seq_length: int, doc_stride: int) -> dict:
    """``{"train": training windows, split: evaluation windows ..., "examples": {split: the examples}}``."""
    check_fast_tokenizer(tokenizer)
    if not 0 <= doc_stride < max_seq_length:
        raise UsageError(f"--doc_stride {doc_stride}: give the overlap of consecutive windows in tokens, >= 0 and "
                         f"below --max_seq_length {max_seq_length} (run_qa: 128 of 384)")
    data = {"examples": {}}
    for name, examples in splits.items():
        if name == "train":
            data[name] = encode_train(examples, tokenizer, max_seq_length, doc_stride)
        else:
            data[name] = encode_eval(examples, tokenizer, max_seq_length, doc_stride)
            data["examples"][name] = examples
    return data


def decode(examples, features, start_logits, end_logits, *, n_best_size: int = 20, max_answer_length: int = 30,
           version_2: bool = False, null_score_diff_threshold: float = 0.0) -> dict[str, str]:
    """Question id -> predicted answer text (``""``: no answer), from every window's logits.

    examples: the split's examples (``id``, ``context``, ``idx``); features: its evaluation windows
    (:func:`encode_eval`); start_logits / end_logits: ``[windows, S]`` (rows may be padded past a window's
    length with any value: positions past its offsets are never read).
    """
    windows_of: dict[int, list[int]] = {}
    for w, example in enumerate(features["example"]):
        windows_of.setdefault(example, []).append(w)
    offsets_of, cls_of = features["offsets"], features["cls_index"]
    predictions = {}
    for qid, context, idx in zip(examples["id"], examples["context"], examples["idx"]):
        best, null = None, None
        for w in windows_of.get(idx, []):
            starts, ends, offsets = np.asarray(start_logits[w]), np.asarray(end_logits[w]), offsets_of[w]
            cls = cls_of[w]
            null_score = float(starts[cls] + ends[cls])
            null = null_score if null is None else min(null, null_score)
            span = best_span(starts, ends, offsets, n_best_size, max_answer_length)
            if span is not None and (best is None or span[0] > best[0]):
                best = span
        text = context[best[1]:best[2]] if best is not None else ""
        if version_2 and null is not None and (best is None or null - best[0] > null_score_diff_threshold):
            text = ""
        predictions[qid] = text
    return predictions


def best_span(starts, ends, offsets, n_best_size: int, max_answer_length: int):
    """``(score, start_char, end_char)`` of the best span of context tokens in one window, or None."""
    length = len(offsets)
    starts, ends = starts[:length], ends[:length]
    best = None
    for s in np.argsort(starts)[::-1][:n_best_size]:
        if offsets[s][0] < 0:
            continue
        for e in np.argsort(ends)[::-1][:n_best_size]:
            if offsets[e][0] < 0 or e < s or e - s + 1 > max_answer_length:
                continue
            score = float(starts[s] + ends[e])
            if best is None or score > best[0]:
                best = (score, offsets[s][0], offsets[e][1])
    return best
