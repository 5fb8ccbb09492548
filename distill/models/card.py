"""The model card (README.md) written next to a distilled student."""

from __future__ import annotations

import os

from distill.common.assets import WIKITEXT_HUB_ID

PIPELINE_TAGS = (  # (end of the student's class name, the Hub's pipeline tag)
    ("ForMaskedLM", "fill-mask"), ("ForSequenceClassification", "text-classification"),
    ("ForPreTraining", "feature-extraction"), ("Model", "feature-extraction"),
)
SENTENCE_TAGS = ["sentence-transformers", "feature-extraction", "sentence-similarity"]


def corpus_dataset(corpus: str | None) -> str | None:
    """The hub dataset id of a corpus spec (``wikitext:...``, ``hub:<id>[:<config>][@<revision>]``); None for
    local text."""
    if not corpus:
        return None
    if corpus.startswith("wikitext:"):
        return WIKITEXT_HUB_ID
    if corpus.startswith("hub:"):
        body = corpus.rpartition("@")[0] if "@" in corpus else corpus
        return body[4:].partition(":")[0] or None
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
    from distill.common.assets import hub_id, resolve_model_name

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
    from distill.common.assets import hub_id

    return hub_id(teacher) or teacher


def sentence_usage() -> list[str]:
    return ["```python", "from sentence_transformers import SentenceTransformer",
            'model = SentenceTransformer("<this folder>")', 'embeddings = model.encode(["A sentence."])', "```", ""]
