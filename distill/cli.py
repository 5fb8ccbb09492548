"""Console scripts: ``distill-init`` and ``distill-train``."""

from __future__ import annotations

import argparse
import sys

from distill.common.errors import ArgumentParser, cli_entry
from distill.models.families import student_types


def _init_epilog() -> str:
    from distill.models.families import family_notes, pairs_text

    notes = "".join(f"{note}.\n" for note in family_notes())
    return f"""\
examples:
  # the seed report's student: BERT-base layers 1,5,8,12 -> a 4-layer DistilBERT
  distill-init --teacher bert-base-uncased --layers 1,5,8,12 --student-type distilbert --output students/bert4l

  # same family, from a local folder (any folder saved with save_pretrained)
  distill-init --teacher ./my-bert --layers 2,4,6 --output students/bert3l

  # MiniLMv2's 6x384 student: a width of its own, so nothing is copied (random init)
  distill-init --teacher bert-base-uncased --num_layers 6 --hidden_size 384 --num_heads 12 --output students/6x384

what is copied (--layers): word and position embeddings and their LayerNorm (token-type
embeddings where the student has them), every selected layer, the teacher's
whole prediction head (masked-LM head or ELECTRA discriminator head) and its
pooler where its checkpoint has one. Student layer i is teacher layer
LAYERS[i]. The folder loads with AutoModel*.from_pretrained and AutoTokenizer.
With --num_layers instead of --layers the student has the size asked for and
every weight is initialised at random (seeded); only the tokenizer, vocabulary,
position count, token types, layer-norm eps and activation come from the teacher.
{notes}supported pairs: {pairs_text()}.
"""


def build_init_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="distill-init",
        description="Build a student from chosen teacher layers (or at a chosen size, initialised at random) "
                    "and save it as a transformers folder.",
        epilog=_init_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--teacher", required=True, metavar="ID_OR_DIR",
                   help="teacher: a hub id (e.g. bert-base-uncased) or a local model folder")
    p.add_argument("--layers", metavar="L1,L2,...",
                   help="teacher layers to copy, 1-based and increasing, e.g. 1,5,8,12 (or give --num_layers)")
    size = p.add_argument_group("a student of chosen size, initialised at random (instead of --layers)")
    size.add_argument("--num_layers", "--num-layers", type=int, metavar="N", help="student depth, e.g. 6")
    size.add_argument("--hidden_size", "--hidden-size", type=int, metavar="H", help="student width (default: the teacher's)")
    size.add_argument("--num_heads", "--num-heads", type=int, metavar="A",
                      help="attention heads; must divide --hidden_size (default: the teacher's head count)")
    size.add_argument("--intermediate_size", "--intermediate-size", type=int, metavar="F",
                      help="feed-forward width (default: the teacher's feed-forward/width ratio x H)")
    size.add_argument("--seed", type=int, default=0, help="seed of the random initialisation")
    p.add_argument("--student-type", choices=student_types(), default=None,
                   help="student architecture (default: the teacher's own family)")
    p.add_argument("--output", required=True, metavar="DIR", help="folder to write (must be new or empty)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    return p


@cli_entry
def init_main(argv=None) -> int:
    parser = build_init_parser()
    args = parser.parse_args(argv)
    sized = [f"--{n}" for n in ("num_layers", "hidden_size", "num_heads", "intermediate_size") if getattr(args, n) is not None]
    if args.layers is not None and sized:
        parser.error(f"--layers copies teacher layers; {', '.join(sized)} builds a student of chosen size at random: give one of the two")
    if args.layers is None and args.num_layers is None:
        parser.error("give --layers (teacher layers to copy, e.g. 1,5,8,12) or --num_layers (a student of chosen size, e.g. 6)")
    if args.layers is None:
        from distill.models.student import (  # heavy imports after --help
            StudentSize,
            init_sized_student,
        )

        size = StudentSize(args.num_layers, args.hidden_size, args.num_heads, args.intermediate_size)
        record = init_sized_student(args.teacher, size, args.output, args.student_type, args.overwrite, args.seed)
        print(f"wrote a {record['num_layers']}-layer {record['student_class']} to {args.output} (hidden size "
              f"{record['hidden_size']}, {record['num_heads']} heads, feed-forward {record['intermediate_size']}; "
              f"initialised: {record['initialised']}, seed {args.seed})")
        return 0
    from distill.models.student import init_student  # heavy imports after --help

    report = init_student(args.teacher, args.layers, args.output, args.student_type, args.overwrite)
    print(f"wrote a {len(report.layers)}-layer {report.student_class} to {args.output} "
          f"(teacher layers {','.join(map(str, report.layers))}; {len(report.copied)} tensors copied)")
    if report.not_copied:
        print(f"note: not in the teacher, left randomly initialised: {', '.join(report.not_copied)}", file=sys.stderr)
    return 0


@cli_entry
def train_main(argv=None) -> int:
    from distill.settings.config import parse_config

    cfg = parse_config(argv)
    from distill.train.loop import (  # heavy imports after --help and config checks
        TrainingError,
        train,
    )

    try:
        train(cfg)
    except TrainingError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0
