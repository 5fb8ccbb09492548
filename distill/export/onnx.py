"""Export a student to ONNX (``MODEL_DIR/onnx/model.onnx``), checked against torch, with int8 beside it.

The exporter is torch's TorchScript one (``dynamo=False``), fed by keyword through the modules of
:mod:`distill.export.graphs`: it needs nothing beyond torch (the dynamo exporter needs
``onnxscript``), gives dynamic batch and sequence axes through ``dynamic_axes``, and the graphs it
writes for every registered family match torch to about 1e-6. The example batch is padded (mixed
lengths): traced on an unpadded batch, transformers may drop the mask path from the graph.

Everything is written into a temporary folder beside ``onnx/`` and renamed at the end, so a
failed parity check or a crash leaves the folder as it was. ``onnx/export.json`` records the
head, the inputs, the files and the figures, and marks the folder as ours.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

from distill.common.errors import UsageError
from distill.common.hardware import CPU_BF16_FLAGS, read_cpu_flags
from distill.common.io import atomic_dir
from distill.export import quantize as q
from distill.export.graphs import HEADS, build_graph
from distill.export.runtime import FP32_FILE, ONNX_DIR, REPORT_FILE, WRITTEN_BY, session
from distill.models.families import family_of, max_positions
from distill.models.sentence import MODULES, TRANSFORMER_CONFIG

PARITY_LIMIT = 1e-4  # fp32 ONNX against torch, max abs difference over real tokens
OPSET = 17
# real sentences of mixed lengths: the parity batch is padded, as a serving batch is
PARITY_SENTENCES = (
    "A cat sat on the mat.",
    "The film is a quiet, patient portrait of a family that never quite learns to talk to itself.",
    "Rain.",
    "Prices rose sharply in the second quarter, the central bank said on Tuesday, and it expects them to keep "
    "rising until the end of the year.",
    "Is this the right way to the station?",
    "An ordinary story, told with real wit and a great deal of warmth.",
    "The committee could not agree, so the vote was postponed.",
    "He left.",
)


def detect_head(folder: str | os.PathLike, config) -> str:
    """``classifier`` for a fine-tuned sequence classifier, ``sentence`` for a sentence-transformers folder,
    else ``encoder``."""
    arch = (getattr(config, "architectures", None) or [""])[0]
    if arch.endswith("ForSequenceClassification"):
        return "classifier"
    return "sentence" if (Path(folder) / MODULES).is_file() else "encoder"


def check_head(folder: str | os.PathLike, config, head: str) -> str:
    """The head to export (``auto`` detected); one line when the folder cannot give the head asked for."""
    if head == "auto":
        arch = (getattr(config, "architectures", None) or [""])[0]
        if arch.endswith(("ForQuestionAnswering", "ForTokenClassification", "ForMultipleChoice")):
            print(f"note: {arch}'s task head is not exported: the graph gives the encoder's hidden states (the "
                  "exporter builds encoder, sentence and classifier graphs); apply the head to them", file=sys.stderr)
        return detect_head(folder, config)
    if head not in HEADS:
        raise UsageError(f"head {head!r} is not one the exporter knows: choose auto, {', '.join(HEADS)}")
    if head == "sentence" and not (Path(folder) / MODULES).is_file():
        raise UsageError(f"--head sentence needs a sentence-transformers folder ({MODULES}); {str(folder)!r} has "
                         "none: use --head encoder")
    if head == "classifier" and detect_head(folder, config) != "classifier":
        raise UsageError(f"--head classifier needs a fine-tuned sequence classifier; {str(folder)!r} is not one "
                         "(config.architectures): fine-tune it with glue-eval --save_model, or use --head encoder")
    return head


def check_output(folder: str | os.PathLike, overwrite: bool) -> Path:
    """``folder/onnx``: new, or written by an earlier export (replaced); anything else is refused."""
    out = Path(folder) / ONNX_DIR
    if out.exists() and not overwrite:
        report = out / REPORT_FILE
        ours = report.is_file() and json.loads(report.read_text(encoding="utf-8") or "{}").get("written_by") == WRITTEN_BY
        if not ours:
            raise UsageError(f"{str(out)!r} exists and was not written by distill-export: move it away, or pass "
                             "--overwrite to replace it")
    return out


def load_for_export(folder: str, head: str):
    """The fp32 torch model of ``head`` and the folder's tokenizer."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from distill.models.loading import load_config

    config = load_config(folder, "model")
    family = family_of(config)
    try:
        cls = AutoModelForSequenceClassification if head == "classifier" else family.cls("base")
        model = cls.from_pretrained(folder, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UsageError(f"cannot load {folder!r} as a {family.name} {head} ({first[:160]}): give a folder saved "
                         "with save_pretrained, with its tokenizer") from None
    return model.eval(), tokenizer


def parity_batch(tokenizer, head: str, max_length: int) -> dict[str, torch.Tensor]:
    """The parity sentences, tokenised and padded; sentence pairs for a classifier (segment ids 0 and 1)."""
    texts = list(PARITY_SENTENCES)
    args = (texts, texts[::-1]) if head == "classifier" else (texts,)
    return dict(tokenizer(*args, padding=True, truncation=True, max_length=max_length, return_tensors="pt"))


def _feed(batch: dict, names: list[str], device) -> dict[str, torch.Tensor]:
    feed = {n: batch[n] if n in batch else torch.zeros_like(batch["input_ids"]) for n in names}
    return {n: t.to(device=device, dtype=torch.long) for n, t in feed.items()}


def torch_outputs(graph, feed: dict[str, torch.Tensor], autocast_bf16: bool = False) -> dict[str, np.ndarray]:
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast_bf16):
        out = graph(**feed)
    out = out if isinstance(out, tuple) else (out,)
    return {name: t.float().cpu().numpy() for name, t in zip(graph.outputs, out)}


def max_abs_diff(ref: dict, got: dict, mask: np.ndarray) -> float:
    """Largest |difference| over every output; token-level outputs compared at real tokens only."""
    worst = 0.0
    for name, value in ref.items():
        diff = np.abs(value - got[name])
        if diff.ndim == 3:
            diff = diff[mask.astype(bool)]
        worst = max(worst, float(diff.max()))
    return worst


def write_onnx(graph, feed: dict[str, torch.Tensor], path: Path) -> None:
    """torch.onnx.export with inputs by name and dynamic batch/sequence axes."""
    names = list(feed)
    axes = {n: {0: "batch", 1: "sequence"} for n in names}
    for out in graph.outputs:
        axes[out] = {0: "batch", 1: "sequence"} if out == "last_hidden_state" else {0: "batch"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation and tracer warnings
        torch.onnx.export(graph, (), str(path), kwargs=feed, input_names=names, output_names=list(graph.outputs),
                          dynamic_axes=axes, opset_version=OPSET, dynamo=False, do_constant_folding=True)


def run_onnx(path: Path, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    sess = session(path)
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feed)))


def pooled(outputs: dict[str, np.ndarray], mask: np.ndarray) -> np.ndarray:
    """One vector a row: the sentence embedding, the logits, or the mean of the real tokens' hidden states."""
    for name in ("sentence_embedding", "logits"):
        if name in outputs:
            return outputs[name]
    weights = mask[..., None].astype(np.float32)
    return (outputs["last_hidden_state"] * weights).sum(1) / np.clip(weights.sum(1), 1e-9, None)


def agreement(ref: dict, got: dict, mask: np.ndarray) -> dict:
    """How a reduced-precision run agrees with fp32: pooled cosine (min, mean), argmax agreement of logits."""
    a, b = pooled(ref, mask).astype(np.float64), pooled(got, mask).astype(np.float64)
    cos = (a * b).sum(1) / np.clip(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12, None)
    figures = {"cosine_min": round(float(cos.min()), 6), "cosine_mean": round(float(cos.mean()), 6)}
    if "logits" in ref and ref["logits"].shape[-1] > 1:
        figures["argmax_agreement"] = float((ref["logits"].argmax(-1) == got["logits"].argmax(-1)).mean())
    if "logits" in ref:
        figures["logits_max_abs_diff"] = float(np.abs(ref["logits"] - got["logits"]).max())
    return figures


def _score(figures: dict) -> tuple:
    return (figures.get("argmax_agreement", 1.0), figures["cosine_mean"])


class Exported:
    """What :func:`export_model` wrote and measured: the file, the graph, the parity feed and torch's outputs."""

    def __init__(self, path, head, graph, feed, reference, max_abs):
        self.path, self.head, self.graph, self.feed, self.reference = path, head, graph, feed, reference
        self.max_abs_diff = max_abs

    @property
    def mask(self) -> np.ndarray:
        return self.feed["attention_mask"]


def export_model(model, tokenizer, out_dir: str | os.PathLike, head: str = "encoder",
                 folder: str | os.PathLike | None = None, max_length: int | None = None) -> Exported:
    """Write ``out_dir/model.onnx`` for an in-memory fp32 ``model`` and check it against torch.

    ``folder``: the model folder whose sentence pipeline a ``sentence`` head exports; ``max_length``: the
    parity batch's token limit (default: 128, or the model's position limit if shorter). The model is
    left as it was found (train/eval mode, device, weights); on a failed parity check (max abs
    difference over real tokens above :data:`PARITY_LIMIT`) the file is removed and a UsageError raised.
    """
    param = next(model.parameters())
    if param.dtype != torch.float32:
        raise UsageError(f"the model's weights are {param.dtype}: export needs float32 weights (load it with "
                         "dtype=torch.float32); int8 is made from the fp32 file")
    # the exporter sets its module to eval and back to that module's own mode afterwards, recursively:
    # a wrapper left in train mode (as a new nn.Module is) would switch the model's dropout on
    max_length = min(max_length or 128, max_positions(model.config))
    was_training = model.training
    graph = build_graph(model, head, folder).eval()
    path = Path(out_dir) / FP32_FILE
    try:
        model.eval()
        feed = _feed(parity_batch(tokenizer, head, max_length), graph.names, param.device)
        reference = torch_outputs(graph, feed)
        write_onnx(graph, feed, path)
    finally:
        model.train(was_training)
    np_feed = {k: v.cpu().numpy() for k, v in feed.items()}
    worst = max_abs_diff(reference, run_onnx(path, np_feed), np_feed["attention_mask"])
    if not worst <= PARITY_LIMIT:
        path.unlink(missing_ok=True)
        raise UsageError(f"ONNX fp32 parity failed: max abs difference to torch {worst:.2e} > {PARITY_LIMIT:g} on "
                         f"{len(PARITY_SENTENCES)} sentences; nothing was written (report it with the model's config)")
    return Exported(path, head, graph, np_feed, reference, worst)


def dynamic_int8(exported: Exported, target_dir: Path, config, per_channel: str, optimize: str, log) -> dict:
    """Dynamic int8 of the fp32 file (fused first where the optimiser fuses and stays within parity);
    per-channel weights where they agree better with fp32 (``auto`` tries both)."""
    import tempfile

    family = family_of(config)
    isa = q.isa_name()
    record = {"mode": "dynamic", "isa": isa, "reduce_range": isa in ("avx512", "avx2")}
    with tempfile.TemporaryDirectory(dir=target_dir, prefix=".int8-") as work:
        work = Path(work)
        source, record["fused_nodes"] = exported.path, 0
        if optimize != "off":
            fused = work / "fused.onnx"
            count = q.optimize_graph(exported.path, fused, getattr(config, family.num_heads_field),
                                     getattr(config, family.hidden_size_field))
            diff = max_abs_diff(exported.reference, run_onnx(fused, exported.feed), exported.mask) if count else None
            if count and diff <= PARITY_LIMIT:
                source, record["fused_nodes"] = fused, count
            elif optimize == "on":
                raise UsageError("--optimize on: ONNX Runtime's optimiser " + (
                    f"changed the outputs by {diff:.2e} (> {PARITY_LIMIT:g})" if count else "fused nothing in this graph")
                    + ": use --optimize auto or off")
        candidates = {"auto": (False, True), "on": (True,), "off": (False,)}[per_channel]
        best = None
        for channel in candidates:
            path = work / f"int8-{int(channel)}.onnx"
            q.quantize_dynamic(source, path, per_channel=channel, reduce_range=record["reduce_range"])
            figures = agreement(exported.reference, run_onnx(path, exported.feed), exported.mask)
            if best is None or _score(figures) > _score(best[2]):
                best = (channel, path, figures)
        channel, path, figures = best
        name = q.int8_file_name(isa=isa)
        os.replace(path, target_dir / name)
    record.update(file=name, per_channel=channel, **figures)
    log(f"int8 (dynamic, {'per-channel' if channel else 'per-tensor'} weights"
        f"{', after ' + str(record['fused_nodes']) + ' fusions' if record['fused_nodes'] else ''}): {name}: "
        + _figures_text(figures, len(exported.mask)))
    return record


def static_int8(exported: Exported, target_dir: Path, tokenizer, calibration_file: str, per_channel: str,
                max_length: int, log) -> dict:
    """Static (QDQ) int8 with activation ranges calibrated on the lines of ``calibration_file``."""
    lines = q.read_calibration(calibration_file)
    feeds = []
    for start in range(0, len(lines), 16):
        batch = tokenizer(lines[start:start + 16], padding=True, truncation=True, max_length=max_length,
                          return_tensors="pt")
        feeds.append({k: v.numpy() for k, v in _feed(batch, list(exported.feed), "cpu").items()})
    name = q.int8_file_name(static=True)
    q.quantize_static(exported.path, target_dir / name, feeds, per_channel=per_channel == "on")
    figures = agreement(exported.reference, run_onnx(target_dir / name, exported.feed), exported.mask)
    log(f"int8 (static, calibrated on {len(lines)} lines of {calibration_file}): {name}: "
        + _figures_text(figures, len(exported.mask)))
    return {"mode": "static", "file": name, "calibration_lines": len(lines), "per_channel": per_channel == "on",
            **figures}


def _figures_text(figures: dict, n: int) -> str:
    text = f"pooled cosine to torch fp32 min {figures['cosine_min']:.4f} mean {figures['cosine_mean']:.4f}"
    if "argmax_agreement" in figures:
        text += f", argmax agreement {100 * figures['argmax_agreement']:.1f}%"
    return text + f" ({n} sentences)"


def bf16_note(exported: Exported) -> dict:
    """What torch bf16 autocast gives where the CPU has native bf16 (no file is needed for it)."""
    flags = read_cpu_flags() or frozenset()
    native = sorted(set(CPU_BF16_FLAGS) & flags)
    if not native:
        return {"native": False, "note": f"this CPU has no {'/'.join(CPU_BF16_FLAGS)}: bf16 is emulated and "
                                         "slower than fp32 here; use int8"}
    feed = {k: torch.from_numpy(v) for k, v in exported.feed.items()}
    device = next(exported.graph.parameters()).device
    if device.type != "cpu":
        return {"native": True, "flags": native, "note": "not measured: the model is not on the CPU"}
    was_training = exported.graph.model.training
    try:
        exported.graph.model.eval()
        got = torch_outputs(exported.graph, feed, autocast_bf16=True)
    finally:
        exported.graph.model.train(was_training)
    figures = agreement(exported.reference, got, exported.mask)
    return {"native": True, "flags": native, "note": "torch.autocast('cpu', dtype=torch.bfloat16) around the "
            "torch model", **figures}


def _folder_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o777 & ~umask


def sequence_settings(folder: str, config, tokenizer) -> tuple[int, bool]:
    """``(max_seq_length, do_lower_case)`` as sentence-transformers reads them (its config, else the tokenizer's
    limit capped by the position table)."""
    path = Path(folder) / TRANSFORMER_CONFIG
    settings = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    limit = max_positions(config)
    length = settings.get("max_seq_length") or min(getattr(tokenizer, "model_max_length", limit) or limit, limit)
    return int(length), bool(settings.get("do_lower_case", False))


def export_folder(folder: str | os.PathLike, head: str = "auto", quantize: str = "dynamic", per_channel: str = "auto",
                  optimize: str = "auto", calibration_file: str | None = None, overwrite: bool = False,
                  log=print) -> dict:
    """``distill-export`` as a function: ``folder/onnx/`` with ``model.onnx``, int8 beside it, ``export.json``.

    Every input is checked before any work; the files appear together or not at all. Returns the report
    (also written to ``onnx/export.json``).
    """
    import onnx
    import onnxruntime
    import transformers

    from distill.models.loading import check_model_path, load_config

    folder = str(folder)
    if not os.path.isdir(folder):
        check_model_path(folder, "model")  # a path that does not exist: one line naming it
        raise UsageError(f"{folder!r} is not a local folder: distill-export writes into the model folder; save the "
                         "model there first (from_pretrained(...).save_pretrained(DIR), with its tokenizer)")
    config = load_config(folder, "model")
    family = family_of(config)
    head = check_head(folder, config, head)
    for name, value in (("per_channel", per_channel), ("optimize", optimize)):
        if value not in ("auto", "on", "off"):
            raise UsageError(f"--{name} {value!r}: choose auto, on or off")
    q.check_mode(quantize, calibration_file)
    out = check_output(folder, overwrite)
    model, tokenizer = load_for_export(folder, head)
    max_length, lowercase = sequence_settings(folder, config, tokenizer)
    with atomic_dir(out, overwrite=True) as tmp:
        exported = export_model(model, tokenizer, tmp, head, folder, min(max_length, 128))
        log(f"{head} of a {family.name} model -> {ONNX_DIR}/{FP32_FILE}: max abs difference to torch "
            f"{exported.max_abs_diff:.1e} over {len(exported.mask)} sentences of mixed lengths (limit {PARITY_LIMIT:g})")
        report = {"written_by": WRITTEN_BY, "head": head, "family": family.name, "inputs": list(exported.feed),
                  "outputs": list(exported.graph.outputs), "max_seq_length": max_length, "do_lower_case": lowercase,
                  "exporter": f"torch.onnx.export (TorchScript, dynamo=False), opset {OPSET}",
                  "files": {"fp32": FP32_FILE}, "fp32_max_abs_diff": exported.max_abs_diff,
                  "parity_sentences": len(exported.mask)}
        if quantize == "dynamic":
            report["int8"] = dynamic_int8(exported, tmp, config, per_channel, optimize, log)
            report["files"]["int8"] = report["int8"]["file"]
        elif quantize == "static":
            report["int8_static"] = static_int8(exported, tmp, tokenizer, calibration_file, per_channel,
                                                min(max_length, 128), log)
            report["files"]["int8_static"] = report["int8_static"]["file"]
        report["bf16"] = bf16_note(exported)
        report["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__,
                              "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}
        (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        os.chmod(tmp, _folder_mode())  # mkdtemp makes 0700: the folder should read like the model folder around it
    return report


__all__ = ["PARITY_LIMIT", "Exported", "agreement", "check_head", "detect_head", "export_folder", "export_model"]
