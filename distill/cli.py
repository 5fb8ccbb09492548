"""Console scripts: ``distill-init`` and ``distill-train``."""

from __future__ import annotations

import argparse
import sys

from .errors import ArgumentParser, cli_entry
from .families import student_types

def _init_epilog() -> str:
    from .families import family_notes, pairs_text

    notes = "".join(f"{note}.\n" for note in family_notes())
    return f"""\
examples:
  # the seed report's student: BERT-base layers 1,5,8,12 -> a 4-layer DistilBERT
  distill-init --teacher bert-base-uncased --layers 1,5,8,12 --student-type distilbert --output students/bert4l

  # same family, from a local folder (any folder saved with save_pretrained)
  distill-init --teacher ./my-bert --layers 2,4,6 --output students/bert3l

what is copied: word and position embeddings and their LayerNorm (token-type
embeddings where the student has them), every selected layer, the teacher's
whole prediction head (masked-LM head or ELECTRA discriminator head) and its
pooler where its checkpoint has one. Student layer i is teacher layer
LAYERS[i]. The folder loads with AutoModel*.from_pretrained and AutoTokenizer.
{notes}supported pairs: {pairs_text()}.
"""


def build_init_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="distill-init",
        description="Build a student from chosen teacher layers and save it as a transformers folder.",
        epilog=_init_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--teacher", required=True, metavar="ID_OR_DIR",
                   help="teacher: a hub id (e.g. bert-base-uncased) or a local model folder")
    p.add_argument("--layers", required=True, metavar="L1,L2,...",
                   help="teacher layers to copy, 1-based and increasing, e.g. 1,5,8,12")
    p.add_argument("--student-type", choices=student_types(), default=None,
                   help="student architecture (default: the teacher's own family)")
    p.add_argument("--output", required=True, metavar="DIR", help="folder to write (must be new or empty)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    return p


@cli_entry
def init_main(argv=None) -> int:
    args = build_init_parser().parse_args(argv)
    from .student import init_student  # heavy imports after --help

    report = init_student(args.teacher, args.layers, args.output, args.student_type, args.overwrite)
    print(f"wrote a {len(report.layers)}-layer {report.student_class} to {args.output} "
          f"(teacher layers {','.join(map(str, report.layers))}; {len(report.copied)} tensors copied)")
    if report.not_copied:
        print(f"note: not in the teacher, left randomly initialised: {', '.join(report.not_copied)}", file=sys.stderr)
    return 0


@cli_entry
def train_main(argv=None) -> int:
    from .config import parse_config

    cfg = parse_config(argv)
    from .train import TrainingError, train  # heavy imports after --help and config checks

    try:
        train(cfg)
    except TrainingError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0
