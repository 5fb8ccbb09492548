"""TinyBERT's data augmentation: N variants of every training example with words replaced.

For each word of a text (a run of letters between non-word characters; special tokens
written in the text, digits, punctuation and words glued to digits such as ``1930s``
stay as they are), a list of candidate words:

- from a masked LM, for a word that is one token: the word is replaced by the mask
  token and the LM's top ``candidates`` predictions there are kept;
- otherwise (a word of several pieces, or no masked LM at hand) its nearest
  neighbours by cosine in the input-embedding space (a several-piece word is the mean
  of its pieces' embeddings). TinyBERT uses GloVe for these; the teacher's own
  embedding table is what this toolkit has offline.

Candidates are whole words of the vocabulary (no special tokens, no ``##`` pieces, no
punctuation) other than the word itself. Each variant then replaces every word that has
candidates with probability ``probability`` by one of them drawn uniformly (TinyBERT:
0.4, top 15). Random draws come from ``(seed, example, variant)`` alone, so the variants
of an example do not depend on the others; the whole set is cached by content
(:func:`augment_texts`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
from dataclasses import asdict, dataclass

import torch

from distill.common.io import atomic_write_text

PROBABILITY = 0.4  # TinyBERT's p_t
CANDIDATES = 15  # TinyBERT's K
WORD = r"[^\W\d_]+"  # a run of letters, any script
# A word in a text: a letter run not glued to digits or underscores ("1930s", "snake_case" stay as they are).
TEXT_WORD = rf"(?<!\w){WORD}(?!\w)"


@dataclass(frozen=True)
class AugmentSettings:
    """What defines a set of variants (with the texts and the candidate source's identity)."""

    variants: int
    seed: int
    probability: float = PROBABILITY
    candidates: int = CANDIDATES


def word_spans(text: str, specials=()) -> list[tuple[int, int]]:
    """``(start, end)`` of each replaceable word of ``text``: letter runs outside any special token."""
    pattern = TEXT_WORD
    if specials:
        alternatives = "|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True))
        pattern = f"(?:{alternatives})|({TEXT_WORD})"
    spans = []
    for m in re.finditer(pattern, text):
        if specials and m.group(1) is None:
            continue  # a special token written in the text is not a word
        spans.append(m.span(1) if specials else m.span())
    return spans


def whole_word_ids(tokenizer) -> torch.Tensor:
    """Vocabulary ids that are whole words: letters only, no special token, no word-continuation piece."""
    vocab = tokenizer.get_vocab()
    specials = set(tokenizer.all_special_tokens)
    # Byte-level BPE and SentencePiece mark a word's first piece (Ġ, ▁); WordPiece marks the others (##).
    starts = [m for m in ("Ġ", "▁") if any(t.startswith(m) for t in vocab)]
    ids = []
    for token, i in vocab.items():
        if token in specials or token.startswith("##"):
            continue
        word = token
        if starts:
            if not token.startswith(tuple(starts)):
                continue
            word = token[1:]
        if re.fullmatch(WORD, word):
            ids.append(i)
    return torch.tensor(sorted(ids), dtype=torch.long)


def _word_of(tokenizer, token_id: int) -> str:
    return tokenizer.convert_ids_to_tokens(int(token_id)).lstrip("Ġ▁")


class CandidateSource:
    """Candidate words from a masked LM (``mlm`` given) and/or an input-embedding table.

    tokenizer: the tokenizer of ``mlm`` / of the model the embeddings belong to.
    embeddings: ``[vocab, width]`` input embeddings (nearest neighbours by cosine).
    name: what the source is (for the cache key), e.g. ``"mlm:<digest>"``.
    """

    def __init__(self, tokenizer, embeddings: torch.Tensor, mlm=None, name: str = "", batch_size: int = 64):
        self.tokenizer = tokenizer
        self.mlm = mlm.eval() if mlm is not None else None
        self.name = name
        self.batch_size = batch_size
        self.allowed = whole_word_ids(tokenizer)
        table = embeddings.detach().float()
        self.embeddings = table
        self.unit = torch.nn.functional.normalize(table[self.allowed], dim=-1)  # [allowed, width]
        self.specials = tuple(tokenizer.all_special_tokens)

    def for_texts(self, texts: list[str], k: int) -> list[list[list[str]]]:
        """Per text, per word span (:func:`word_spans`), up to ``k`` candidate words."""
        spans = [word_spans(t, self.specials) for t in texts]
        out = [[None] * len(s) for s in spans]
        masked = []  # (text index, word index, masked text) for one-token words
        pieces_of: dict[str, list[int]] = {}  # a word's pieces, and its neighbours, are looked up once per word
        neighbours: dict[str, list[str]] = {}
        for i, (text, text_spans) in enumerate(zip(texts, spans)):
            for j, (a, b) in enumerate(text_spans):
                word = text[a:b]
                if word not in pieces_of:
                    pieces_of[word] = self.tokenizer(word, add_special_tokens=False)["input_ids"]
                pieces = pieces_of[word]
                if self.mlm is not None and len(pieces) == 1:
                    masked.append((i, j, text[:a] + self.tokenizer.mask_token + text[b:], pieces[0]))
                else:
                    if word not in neighbours:
                        neighbours[word] = self._neighbours(pieces, k)
                    out[i][j] = list(neighbours[word])
        for start in range(0, len(masked), self.batch_size):
            chunk = masked[start:start + self.batch_size]
            for (i, j, _, own), words in zip(chunk, self._predict([m[2] for m in chunk], [m[3] for m in chunk], k)):
                out[i][j] = words
        return out

    def _neighbours(self, pieces: list[int], k: int) -> list[str]:
        if not pieces:
            return []
        vector = torch.nn.functional.normalize(self.embeddings[pieces].mean(0), dim=-1)
        scores = self.unit @ vector
        if len(pieces) == 1:
            scores[self.allowed == pieces[0]] = -float("inf")  # the word itself is no replacement
        top = scores.topk(min(k, len(scores))).indices
        return [_word_of(self.tokenizer, self.allowed[t]) for t in top.tolist() if scores[t] > -float("inf")]

    @torch.no_grad()
    def _predict(self, texts: list[str], own: list[int], k: int) -> list[list[str]]:
        device = next(self.mlm.parameters()).device
        enc = self.tokenizer(texts, padding=True, truncation=True, return_tensors="pt").to(device)
        masks = enc["input_ids"] == self.tokenizer.mask_token_id
        first = masks & (masks.cumsum(1) == 1)  # each row's first mask (a text may hold the mask string itself)
        at_mask = self._logits_at(enc, first)  # [rows with a mask, vocab], in row order
        has_mask = first.any(1).tolist()
        out, taken = [], 0
        for row, own_id in zip(range(len(texts)), own):
            if not has_mask[row]:  # the mask fell past the truncation: no candidates
                out.append([])
                continue
            scores = at_mask[taken].float()[self.allowed.to(device)]
            taken += 1
            scores[self.allowed.to(device) == own_id] = -float("inf")
            top = scores.topk(min(k, len(scores))).indices.tolist()
            out.append([_word_of(self.tokenizer, self.allowed[t]) for t in top])
        return out

    def _logits_at(self, enc, positions: torch.Tensor) -> torch.Tensor:
        """The masked LM's logits at ``positions`` only: the vocabulary head (as costly as a small model's
        body at these lengths) runs at one position per row instead of every one. A family the toolkit
        does not know runs whole."""
        from distill.models.families import FAMILIES
        from distill.models.loading import extract

        if getattr(self.mlm.config, "model_type", None) in FAMILIES:
            return extract(self.mlm, enc["input_ids"], enc["attention_mask"], positions=positions,
                           token_type_ids=enc.get("token_type_ids")).logits
        return self.mlm(**enc).logits[positions]


def make_variants(text: str, spans, candidates, settings: AugmentSettings, example: int) -> list[str]:
    """``settings.variants`` texts: each word with candidates replaced with ``settings.probability``."""
    out = []
    for v in range(settings.variants):
        rng = random.Random(f"{settings.seed}:{example}:{v}")
        pieces, last = [], 0
        for (a, b), words in zip(spans, candidates):
            # Two draws per word whether or not it has candidates: a word's fate never shifts the others'.
            replace, pick = rng.random() < settings.probability, rng.random()
            if replace and words:
                pieces.append(text[last:a] + words[int(pick * len(words))])
                last = b
        pieces.append(text[last:])
        out.append("".join(pieces))
    return out


def augment_columns(columns: dict[str, list[str]], source: CandidateSource, settings: AugmentSettings
                    ) -> dict[str, list]:
    """Variants of every row of ``columns`` (text field -> texts, same length).

    Returns the same fields plus ``origin`` (the row each variant comes from), ``variants``
    rows per original row, in row order. Every text field of a row is augmented (with
    different draws per field).
    """
    fields = list(columns)
    n = len(columns[fields[0]]) if fields else 0
    out = {f: [] for f in fields}
    per_field = {}
    for f_index, f in enumerate(fields):
        texts = columns[f]
        spans = [word_spans(t, source.specials) for t in texts]
        cands = source.for_texts(texts, settings.candidates)
        per_field[f] = [make_variants(t, s, c, settings, example=row * len(fields) + f_index)
                        for row, (t, s, c) in enumerate(zip(texts, spans, cands))]
    for row in range(n):
        for f in fields:
            out[f].extend(per_field[f][row])
    out["origin"] = [row for row in range(n) for _ in range(settings.variants)]
    return out


def cache_key(columns: dict[str, list[str]], settings: AugmentSettings, source_name: str) -> str:
    """Content key of a variant set: the texts, the settings and the candidate source."""
    h = hashlib.sha256()
    h.update(json.dumps({"settings": asdict(settings), "source": source_name}, sort_keys=True).encode())
    for f in sorted(columns):
        h.update(f.encode() + b"\0")
        for t in columns[f]:
            h.update(t.encode() + b"\0")
    return h.hexdigest()[:20]


def augment_texts(columns: dict[str, list[str]], settings: AugmentSettings, cache_dir: str, source_name: str,
                  load_source) -> tuple[dict[str, list], str, bool]:
    """Variants of ``columns``, made once: read from ``cache_dir/<key>.json`` when there.

    load_source: zero-argument function returning the :class:`CandidateSource` (called only on a miss).
    Returns (columns of variants with ``origin``, the cache file, whether it was a hit).
    """
    path = os.path.join(cache_dir, f"{cache_key(columns, settings, source_name)}.json")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return json.load(f)["variants"], path, True
    variants = augment_columns(columns, load_source(), settings)
    record = {"settings": asdict(settings), "source": source_name, "variants": variants}
    atomic_write_text(path, json.dumps(record) + "\n")
    return variants, path, False


# ----------------------------------------------------------------------------- the candidate source


def model_digest(folder: str) -> str:
    """Digest of a model folder's config and weight files (content, not path)."""
    h = hashlib.sha256()
    for name in sorted(os.listdir(folder)):
        if name == "config.json" or name.endswith((".safetensors", ".bin")):
            with open(os.path.join(folder, name), "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest()[:16]


@contextlib.contextmanager
def _quiet():
    """Loading a classifier folder as a masked LM (or a base model) reports every head key it skips: expected."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def has_mlm_head(folder: str) -> bool:
    """Whether ``folder``'s weights include a masked-LM head (a classifier saved alone has none)."""
    from transformers import AutoModelForMaskedLM

    try:
        with _quiet():
            _, info = AutoModelForMaskedLM.from_pretrained(folder, output_loading_info=True)
    except (OSError, ValueError):
        return False
    return not info.get("missing_keys")


def describe_source(teacher: str, augment_model: str | None) -> tuple[str, str, str]:
    """(kind, folder, name for the cache key): ``--augment_model``, else the teacher's MLM head, else its embeddings."""
    if augment_model:
        return "mlm", augment_model, f"mlm:{model_digest(augment_model)}"
    if has_mlm_head(teacher):
        return "mlm", teacher, f"mlm:{model_digest(teacher)}"
    return "embeddings", teacher, f"embeddings:{model_digest(teacher)}"


def load_source(kind: str, folder: str, tokenizer=None, device=None) -> CandidateSource:
    """The :class:`CandidateSource` of :func:`describe_source`'s (kind, folder)."""
    from transformers import AutoModel, AutoModelForMaskedLM, AutoTokenizer

    from distill.models.loading import TOKENIZER_FILES

    if any(os.path.isfile(os.path.join(folder, f)) for f in TOKENIZER_FILES):
        tokenizer = AutoTokenizer.from_pretrained(folder)
    if kind == "mlm":
        with _quiet():
            mlm = AutoModelForMaskedLM.from_pretrained(folder)
        if device is not None:
            mlm.to(device)
        return CandidateSource(tokenizer, mlm.get_input_embeddings().weight.cpu(), mlm=mlm, name=folder)
    with _quiet():
        base = AutoModel.from_pretrained(folder)
    return CandidateSource(tokenizer, base.get_input_embeddings().weight, name=folder)
