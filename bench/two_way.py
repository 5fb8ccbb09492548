"""The flags, setup, step and ending shared by the benches that time one way against another
(``bench.relations``, ``bench.logit_grad``)."""

from __future__ import annotations

import torch

from bench.common import paired_ratio, set_threads, summary, write_json


def two_way_flags(parser, precision: str) -> None:
    """The flags the two-way benches share; :func:`two_way_setup` reads them."""
    parser.add_argument("--precision", default=precision, help="fp32, bf16 or auto (distill-train's choice here)")
    parser.add_argument("--threads", default="auto", help="torch CPU threads: a number or auto (bench.speed's rule)")
    parser.add_argument("--out", help="write the results as JSON here")


def two_way_setup(parser, args):
    """``(why this thread count, device, precision name, Precision)`` from :func:`two_way_flags`' flags."""
    from distill.common.hardware import auto_precision_here
    from distill.train.precision import Precision

    threads_why = set_threads(args.threads)
    device = torch.device("cpu")
    name = auto_precision_here("cpu")[0] if args.precision == "auto" else args.precision
    if name not in ("fp32", "bf16"):
        parser.error(f"--precision {args.precision!r}: this CPU bench runs fp32 or bf16 (or auto)")
    return threads_why, device, name, Precision.from_config(name, device=device)


def two_way_step(engine, prec, optimizer, batch: dict, way):
    """One timed distillation step for the two-way benches: ``engine`` (distill-train's ``StudentStep``) under
    ``way()`` (the context that selects one way) and the precision's autocast, then backward, clip at 5, step."""
    def run():
        with way(), prec.autocast():
            loss = engine(batch)[0]
        prec.backward(loss)
        prec.step(optimizer, max_grad_norm=5.0)
    return run


def two_way_ending(report: dict, parts: dict, before: str, after: str, tokens: int, out: str | None,
                   figures: dict[str, str], difference: tuple[str, float]) -> None:
    """The common ending of the two-way benches: each part's summaries (tokens/s for the ``"step"`` part) and its
    ``before / after`` ratio under ``figures[part]`` into ``report``, the JSON written atomically to ``out``, then
    one ``name: value`` line per figure."""
    for part, runs in parts.items():
        report[part] = {name: summary(r, tokens if part == "step" else None) for name, r in runs.items()}
        report[figures[part]] = paired_ratio(runs, before, after)
    if out:
        write_json(out, report)
    print(f"{difference[0]}: {difference[1]:.2e}")
    for part in parts:
        print(f"{figures[part]}: {report[figures[part]]['value']:.2f}")
    for name in (before, after):
        print(f"step_tokens_per_s_{name}: {report['step'][name]['tokens_per_s']:.0f}")
