"""Small extractive-QA sets of real text, in SQuAD's JSON layout, built by the tests.

Passages are paragraphs of the offline Wikipedia extract (distill.common.assets.wiki_extract_path) that hold exactly
one year; the question asks for it and the gold answer is that year's span, so every answer is known to the test.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

YEAR = re.compile(r"\b(1[5-9]\d\d|20\d\d)\b")
QUESTIONS = ("in what year?", "which year is it?", "what year was it?")


@functools.lru_cache(maxsize=1)
def year_paragraphs(count: int = 120, shortest: int = 150, longest: int = 600) -> tuple[str, ...]:
    """The first ``count`` paragraphs of the Wikipedia extract that name exactly one year."""
    from distill.common.assets import wiki_extract_path
    from distill.data.corpus import iter_documents

    found = []
    for document in iter_documents(wiki_extract_path()):
        for paragraph in document:
            if len(YEAR.findall(paragraph)) == 1 and shortest < len(paragraph) < longest:
                found.append(paragraph)
        if len(found) >= count:
            break
    return tuple(found[:count])


def squad_document(paragraphs, prefix: str, no_answer_every: int = 0) -> dict:
    """SQuAD's layout; every ``no_answer_every``-th question (v2) gets a passage without its year and no answer."""
    articles = []
    for i, paragraph in enumerate(paragraphs):
        match = YEAR.search(paragraph)
        qa = {"id": f"{prefix}{i}", "question": QUESTIONS[i % len(QUESTIONS)],
              "answers": [{"text": match.group(1), "answer_start": match.start(1)}]}
        context = paragraph
        if no_answer_every and i % no_answer_every == 0:
            context = YEAR.sub("", paragraph)
            qa.update(answers=[], is_impossible=True)
        articles.append({"title": f"article {i}", "paragraphs": [{"context": context, "qas": [qa]}]})
    return {"version": "test", "data": articles}


def write_squad(folder, train, dev, version_2: bool = False, no_answer_every: int = 0) -> Path:
    """``folder`` holding SQuAD's own file names (``train-v1.1.json``/``dev-v1.1.json``, or ``-v2.0``)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tag = "v2.0" if version_2 else "v1.1"
    for name, paragraphs in (("train", train), ("dev", dev)):
        document = squad_document(paragraphs, name, no_answer_every)
        (folder / f"{name}-{tag}.json").write_text(json.dumps(document), encoding="utf-8")
    return folder
