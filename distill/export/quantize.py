"""int8 beside the fp32 file: ONNX Runtime dynamic quantisation (optionally after its transformer
graph optimiser), or static quantisation calibrated on a user's text file.

File names follow the clients: sentence-transformers' ``export_dynamic_quantized_onnx_model``
writes ``onnx/model_qint8_<isa>.onnx`` (``avx512_vnni``, ``avx512``, ``avx2``, ``arm64``), which
``SentenceTransformer(folder, backend="onnx", model_kwargs={"file_name": ...})`` and optimum's
``ORTModel*.from_pretrained(folder, subfolder="onnx", file_name=...)`` load. The ISA named is the
one of the machine that quantised: on a CPU without VNNI, weights use 7 bits (``reduce_range``),
which avoids the saturation of the int8 dot products there.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
from pathlib import Path

import numpy as np

from distill.common.errors import UsageError
from distill.common.hardware import read_cpu_flags

MODES = ("dynamic", "static", "none")


def isa_name(flags: frozenset[str] | None = None, machine: str | None = None) -> str:
    """The instruction-set tag of a quantised file's name, as sentence-transformers' configs name them."""
    machine = (machine or platform.machine()).lower()
    if machine in ("aarch64", "arm64"):
        return "arm64"
    flags = read_cpu_flags() if flags is None else flags
    flags = flags or frozenset()
    if "avx512_vnni" in flags or "avx512vnni" in flags:
        return "avx512_vnni"
    if "avx512f" in flags:
        return "avx512"
    return "avx2" if "avx2" in flags else "quantized"


def int8_file_name(static: bool = False, isa: str | None = None) -> str:
    return "model_qint8_static.onnx" if static else f"model_qint8_{isa or isa_name()}.onnx"


def check_mode(mode: str, calibration_file: str | None) -> None:
    """A quantisation mode that this ONNX Runtime offers, with what it needs; one line otherwise."""
    import onnxruntime
    from onnxruntime import quantization

    offered = [m for m in MODES if m == "none" or hasattr(quantization, f"quantize_{m}")]
    if mode not in offered:
        raise UsageError(f"quantisation mode {mode!r} is not one this ONNX Runtime ({onnxruntime.__version__}) "
                         f"offers: choose {', '.join(offered)}")
    if mode == "static" and not calibration_file:
        raise UsageError("--quantize static needs --calibration_file TEXTS (one sentence per line, a few hundred "
                         "from the serving domain); or use --quantize dynamic, which needs none")
    if calibration_file and mode != "static":
        raise UsageError(f"--calibration_file is for --quantize static (not {mode}): drop it or say --quantize static")
    if calibration_file and not os.path.isfile(calibration_file):
        raise UsageError(f"calibration file {calibration_file!r} does not exist: give a text file, one sentence a line")


def optimize_graph(source: Path, target: Path, num_heads: int, hidden_size: int) -> int:
    """ONNX Runtime's transformer optimiser (attention, LayerNorm, GELU fusions) -> fused node count.

    0 when nothing fused (the model is then left unwritten): the graph was not one its BERT patterns
    recognise, and the plain graph is quantised instead.
    """
    from onnxruntime.transformers import optimizer

    logging.getLogger("onnxruntime.transformers").setLevel(logging.ERROR)  # it logs every fusion it tries
    optimized = optimizer.optimize_model(str(source), model_type="bert", num_heads=num_heads,
                                         hidden_size=hidden_size, opt_level=1)
    fused = sum(optimized.get_fused_operator_statistics().values())
    if fused:
        optimized.save_model_to_file(str(target))
    return fused


@contextlib.contextmanager
def _quiet_root_logger():
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def quantize_dynamic(source: Path, target: Path, per_channel: bool, reduce_range: bool) -> None:
    from onnx import TensorProto
    from onnxruntime.quantization import QuantType, quantize_dynamic as ort_quantize

    # the fused graph's com.microsoft nodes defeat ONNX shape inference: their outputs are float32
    with _quiet_root_logger():  # the quantiser logs a pre-processing hint on the root logger at every call
        ort_quantize(str(source), str(target), per_channel=per_channel, reduce_range=reduce_range,
                     weight_type=QuantType.QInt8, extra_options={"DefaultTensorType": TensorProto.FLOAT})


def read_calibration(path: str, limit: int = 256) -> list[str]:
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = [line.strip() for line in f if line.strip()]
    if not lines:
        raise UsageError(f"calibration file {path!r} holds no text: one sentence a line")
    return lines[:limit]


def quantize_static(source: Path, target: Path, feeds: list[dict[str, np.ndarray]], per_channel: bool) -> None:
    """QDQ int8 with activation ranges from ``feeds`` (tokenised batches of the calibration texts)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType
    from onnxruntime.quantization import quantize_static as ort_quantize

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(feeds)

        def get_next(self):
            return next(self.batches, None)

    with _quiet_root_logger():
        ort_quantize(str(source), str(target), Reader(), quant_format=QuantFormat.QDQ, per_channel=per_channel,
                     activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)


__all__ = ["MODES", "check_mode", "int8_file_name", "isa_name", "optimize_graph", "quantize_dynamic",
           "quantize_static", "read_calibration"]
