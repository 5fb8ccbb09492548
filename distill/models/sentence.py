"""sentence-transformers teachers give sentence-transformers students.

A sentence-transformers model is a transformers folder plus a pipeline around it:
``modules.json`` lists the modules in order (Transformer, then e.g. Pooling, Dense,
Normalize), each module other than the Transformer keeps its settings (and a Dense its
weights) in a sub-folder such as ``1_Pooling/``, and ``sentence_bert_config.json`` holds
the Transformer's ``max_seq_length`` and lower-casing. A student built from such a teacher
keeps the same pipeline, so ``SentenceTransformer(student)`` pools, projects and
normalises exactly as ``SentenceTransformer(teacher)`` does; without these files it would
guess mean pooling and drop the normalisation.

The pipeline is read from the teacher (and checked against the student) before any work,
and written beside the student's weights when the student is saved. Reading needs no
sentence-transformers install: the files are plain JSON (and a Dense layer's tensors),
copied as they are apart from what the student changes (the Transformer module's path,
the embedding width the Pooling module reports, ``max_seq_length`` capped by the
student's position limit).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from distill.common.errors import UsageError

MODULES = "modules.json"
TRANSFORMER_CONFIG = "sentence_bert_config.json"
MODEL_CONFIG = "config_sentence_transformers.json"  # prompts, similarity function, versions: copied as is
# the files a module sub-folder may hold (only needed for hub ids, where a folder cannot be listed)
MODULE_FILES = ("config.json", "model.safetensors", "pytorch_model.bin")


def _kind(module: dict) -> str:
    """``"Transformer"``, ``"Pooling"``, ``"Dense"``, ``"Normalize"``... from the module's class path."""
    return str(module.get("type", "")).rsplit(".", 1)[-1]


def _fetch(source: str, relpath: str) -> Path | None:
    """Local path of ``relpath`` inside a model folder or a hub repo (cache or download); None when absent."""
    if os.path.isdir(source):
        path = Path(source) / relpath
        return path if path.is_file() else None
    from transformers.utils import cached_file

    try:
        found = cached_file(source, relpath, _raise_exceptions_for_missing_entries=False,
                            _raise_exceptions_for_connection_errors=False)
    except (OSError, ValueError):
        return None
    return Path(found) if found else None


def _module_files(source: str, folder: str) -> dict[str, bytes]:
    """Every file of one module sub-folder, by path relative to the model folder."""
    if os.path.isdir(source):
        root = Path(source) / folder
        if not root.is_dir():
            return {}
        return {str(p.relative_to(source)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
    files = {}
    for name in MODULE_FILES:
        path = _fetch(source, f"{folder}/{name}")
        if path is not None:
            files[f"{folder}/{name}"] = path.read_bytes()
    return files


@dataclass
class SentencePipeline:
    """The sentence-transformers files a student folder needs, ready to write (path -> bytes)."""

    source: str
    modules: list[dict]
    files: dict[str, bytes] = field(default_factory=dict)

    def describe(self) -> str:
        """e.g. ``Transformer(max_seq_length=256) -> Pooling(mean) -> Normalize``."""
        parts = []
        for module in self.modules:
            kind = _kind(module)
            config = self._config(module)
            if kind == "Transformer":
                length = json.loads(self.files[TRANSFORMER_CONFIG]).get("max_seq_length")
                # sentence-transformers 6 keeps the length as the tokenizer's model_max_length instead
                parts.append(f"Transformer(max_seq_length={length})" if length else "Transformer")
            elif kind == "Pooling":
                parts.append(f"Pooling({pooling_mode(config)})")
            elif kind == "Dense":
                parts.append(f"Dense({config.get('in_features')}->{config.get('out_features')})")
            else:
                parts.append(kind)
        return " -> ".join(parts)

    def _config(self, module: dict) -> dict:
        raw = self.files.get(f"{module['path']}/config.json") if module.get("path") else None
        return json.loads(raw) if raw else {}

    def write(self, folder: str | os.PathLike) -> None:
        """Write the pipeline's files into a student folder (its weights and tokenizer are written apart)."""
        folder = Path(folder)
        for rel, data in self.files.items():
            path = folder / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)


def pooling_mode(config: dict) -> str:
    """The pooling modes of a Pooling config joined by ``+``, in either layout (6.x ``pooling_mode``, or 2.x
    booleans read as sentence-transformers reads them: its fixed order, whatever the file's key order, and
    ``mean`` when none is on), with sentence-transformers' names (``mean_sqrt_len_tokens``)."""
    if "pooling_mode" in config:
        mode = config["pooling_mode"]
        return mode if isinstance(mode, str) else "+".join(mode)
    return "+".join(mode for key, mode in _LEGACY_MODES if config.get(key) is True) or "mean"


def is_sentence_model(source: str) -> bool:
    """Whether ``source`` (a folder or hub id) is a sentence-transformers model (it has ``modules.json``)."""
    return _fetch(source, MODULES) is not None


def pipeline_source(teacher: str, student: str | None = None) -> str | None:
    """Where a student's sentence pipeline comes from: a given student folder's own, else the teacher's."""
    if student and is_sentence_model(student):
        return student
    return teacher if is_sentence_model(teacher) else None


def read_pipeline(source: str, student_config, what: str = "teacher") -> SentencePipeline | None:
    """The pipeline of sentence-transformers model ``source``, adapted to a student; None for a plain model.

    ``student_config`` is the student's transformers config: its width must fit the modules
    after the Transformer (a Pooling of that width; a Dense layer that takes it).
    """
    modules_path = _fetch(source, MODULES)
    if modules_path is None:
        return None
    try:
        modules = json.loads(modules_path.read_text(encoding="utf-8"))
        assert isinstance(modules, list) and all(isinstance(m, dict) and "path" in m for m in modules)
    except (json.JSONDecodeError, AssertionError):
        raise UsageError(f"the {what} {source!r} has a {MODULES} that is not a list of modules: "
                         "re-save it with SentenceTransformer.save") from None
    kinds = [_kind(m) for m in modules]
    if kinds.count("Transformer") != 1 or kinds[0] != "Transformer":
        raise UsageError(f"the {what} {source!r} has modules {kinds}: a student can carry only a pipeline that "
                         "starts with one Transformer module")
    width = student_config.hidden_size if hasattr(student_config, "hidden_size") else student_config.dim
    from distill.models.families import max_positions as positions_of

    # the longest input its position table holds (RoBERTa, XLM-R, MPNet: the table less the padding offset)
    max_positions = positions_of(student_config) if getattr(student_config, "max_position_embeddings", None) else None

    files: dict[str, bytes] = {}
    out_modules = []
    for module in modules:
        module = dict(module)
        if _kind(module) == "Transformer":
            # the student's own weights and tokenizer sit at the folder's root: so does its module
            settings_path = _fetch(source, f"{module['path']}/{TRANSFORMER_CONFIG}" if module["path"] else TRANSFORMER_CONFIG)
            settings = json.loads(settings_path.read_text(encoding="utf-8")) if settings_path else {}
            if max_positions and settings.get("max_seq_length") and settings["max_seq_length"] > max_positions:
                settings["max_seq_length"] = max_positions
            files[TRANSFORMER_CONFIG] = (json.dumps(settings, indent=2) + "\n").encode()
            module["path"] = ""
        else:
            files.update(_module_files(source, module["path"]))
        out_modules.append(module)
    pipeline = SentencePipeline(source, out_modules, files)
    _fit_width(pipeline, width, source, what)
    files[MODULES] = (json.dumps(out_modules, indent=2) + "\n").encode()
    extra = _fetch(source, MODEL_CONFIG)
    if extra is not None:
        files[MODEL_CONFIG] = extra.read_bytes()
    return pipeline


def _fit_width(pipeline: SentencePipeline, width: int, source: str, what: str) -> None:
    """The module after the Transformer sees the student's width: a Pooling reports it, a Dense must take it."""
    features = width
    for module in pipeline.modules[1:]:
        kind, config = _kind(module), pipeline._config(module)
        if kind == "Pooling":
            for key in ("word_embedding_dimension", "embedding_dimension"):
                if key in config:
                    config[key] = features
            pipeline.files[f"{module['path']}/config.json"] = (json.dumps(config, indent=2) + "\n").encode()
            features *= len(pooling_mode(config).split("+"))  # several modes are concatenated
        elif kind == "Dense":
            if config.get("in_features") not in (None, features):
                raise UsageError(
                    f"the {what} {source!r} has a Dense module taking {config.get('in_features')} features but "
                    f"the student is {width} wide: a student of the teacher's width keeps its sentence pipeline")
            features = config.get("out_features", features)


# the modes distill.objective.losses.pool_sentence computes (models/ sits below objective/: named here too)
POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens", "lasttoken")
# sentence-transformers' legacy Pooling flags, in the order it concatenates the modes they turn on
_LEGACY_MODES = (("pooling_mode_cls_token", "cls"), ("pooling_mode_max_tokens", "max"),
                 ("pooling_mode_mean_tokens", "mean"), ("pooling_mode_mean_sqrt_len_tokens", "mean_sqrt_len_tokens"),
                 ("pooling_mode_weightedmean_tokens", "weightedmean"), ("pooling_mode_lasttoken", "lasttoken"))


def sentence_pooling(source: str, what: str = "teacher") -> dict | None:
    """How a sentence-transformers model turns token states into its embedding: ``{"modes": ["mean"],
    "normalize": True}`` (its Pooling modes, in the order it concatenates them, and whether a Normalize
    follows); None for a plain transformers model (sentence-transformers would mean-pool it).

    A pipeline whose embedding is more than pooled token states (a Dense layer, a second Pooling) is
    refused with one line: the sentence-embedding terms pool the hidden states themselves.
    """
    modules_path = _fetch(source, MODULES) if source else None
    if modules_path is None:
        return None
    try:
        modules = json.loads(modules_path.read_text(encoding="utf-8"))
        kinds = [_kind(m) for m in modules]
    except (json.JSONDecodeError, TypeError, AttributeError):
        raise UsageError(f"the {what} {source!r} has a {MODULES} that is not a list of modules: "
                         "re-save it with SentenceTransformer.save") from None
    if kinds[:2] != ["Transformer", "Pooling"] or any(k != "Normalize" for k in kinds[2:]):
        raise UsageError(f"the {what} {source!r} makes its sentence embedding with modules {kinds}: the "
                         "sentence-embedding terms (sent_mse, sent_cos) follow Transformer -> Pooling [-> Normalize] "
                         "only; distil its token states instead (hid_mse, cos)")
    config_path = _fetch(source, f"{modules[1]['path']}/config.json")
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path else {}
    modes = pooling_mode(config).split("+")
    unknown = [m for m in modes if m not in POOLING_MODES]
    if unknown:
        raise UsageError(f"the {what} {source!r} pools with {unknown[0]!r}: the sentence-embedding terms pool with "
                         f"{', '.join(POOLING_MODES)}")
    return {"modes": modes, "normalize": "Normalize" in kinds}


__all__ = ["SentencePipeline", "is_sentence_model", "pipeline_source", "pooling_mode", "read_pipeline",
           "sentence_pooling"]
