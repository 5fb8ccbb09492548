"""``distill-export MODEL_DIR``: ONNX fp32 and int8 of a student, checked against torch."""

from __future__ import annotations

from distill.common.errors import ArgumentParser, cli_entry

EPILOG = """\
writes MODEL_DIR/onnx/: model.onnx (fp32, dynamic batch and sequence axes), model_qint8_<isa>.onnx
(dynamic int8; or model_qint8_static.onnx with --quantize static) and export.json (head, inputs,
files, the figures printed). Load them with distill.export.runtime.OnnxEncoder(MODEL_DIR).encode(...)
or OnnxClassifier; with onnxruntime.InferenceSession(MODEL_DIR + "/onnx/model.onnx"); or, on a stack
with optimum.onnxruntime, SentenceTransformer(MODEL_DIR, backend="onnx"). See docs/deploy.md.
"""


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="distill-export", epilog=EPILOG,
                       description="Export a student folder to ONNX (fp32 and int8), checked against torch.")
    p.add_argument("model_dir", metavar="MODEL_DIR", help="a model folder saved with save_pretrained (a distilled "
                   "student, a sentence-transformers student, or a glue-eval --save_model classifier)")
    p.add_argument("--head", default="auto", help="auto (default: classifier for a fine-tuned classifier, sentence "
                   "for a sentence-transformers folder, else encoder), encoder, sentence or classifier")
    p.add_argument("--quantize", default="dynamic", help="dynamic (default: int8 weights, no data needed), "
                   "static (int8 calibrated on --calibration_file), or none")
    p.add_argument("--calibration_file", default=None, metavar="TEXTS",
                   help="--quantize static: a text file, one sentence a line (the first 256 are used)")
    p.add_argument("--per_channel", default="auto", choices=("auto", "on", "off"),
                   help="int8 weights per output channel: auto (default) keeps whichever agrees better with fp32")
    p.add_argument("--optimize", default="auto", choices=("auto", "on", "off"),
                   help="ONNX Runtime's transformer fusions before dynamic int8: auto (default) where they fuse "
                        "and keep parity")
    p.add_argument("--overwrite", action="store_true", help="replace a MODEL_DIR/onnx that distill-export did not write")
    return p


@cli_entry
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from distill.export.onnx import export_folder  # torch and onnx after --help and the argument checks

    report = export_folder(args.model_dir, head=args.head, quantize=args.quantize, per_channel=args.per_channel,
                           optimize=args.optimize, calibration_file=args.calibration_file, overwrite=args.overwrite)
    print(f"wrote {args.model_dir}/onnx: {', '.join(report['files'].values())}, export.json")
    if report["bf16"].get("native"):
        print(f"bf16 (no file needed): torch autocast gives pooled cosine {report['bf16']['cosine_min']:.5f} "
              "(min) to fp32; bench/deploy.py times it")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
