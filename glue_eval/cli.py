"""``glue-eval``: fine-tune and evaluate on GLUE (one run, ``--task all``, or ``--grid``), and ``glue-eval report``.

    glue-eval --model STUDENT --task rte --output_dir OUT [any TrainingArguments flag]
    glue-eval --model STUDENT --grid default --output_dir OUT
    glue-eval report OUT [--teacher_results TEACHER_OUT]
    glue-eval --backend torch,onnx,onnx-int8 --model FINETUNED --task rte --output_dir OUT   (backends.py)
    glue-eval --multitask TASKS.json --model STUDENT --output_dir OUT   (multitask/, docs/multitask.md)

Arguments are parsed with :class:`distill.settings.arguments.DataclassParser` (the convention distill-train
shares: transformers' ``HfArgumentParser`` plus JSON-valued fields) over :class:`GlueArguments` and
``TrainingArguments`` (so ``--learning_rate``, ``--per_device_train_batch_size``,
``--num_train_epochs``, ``--seed``, ``--fp16``, ``--bf16`` ... are Trainer's own);
a single ``.json`` argument holds them all, as in transformers' examples.
"""

from __future__ import annotations

import sys

from distill.common.errors import ArgumentParser, UsageError, cli_entry


def _parse(argv: list[str]):
    from distill.settings.arguments import DataclassParser

    from .arguments import GlueArguments, GlueTrainingArguments

    parser = DataclassParser((GlueArguments, GlueTrainingArguments), prog="glue-eval",
                             description="Fine-tune on GLUE tasks with transformers' Trainer and grade on dev. "
                                         "'glue-eval report OUT' writes the results table.")
    try:
        if len(argv) == 1 and argv[0].endswith(".json"):
            import json

            try:
                with open(argv[0], encoding="utf-8") as f:
                    given = json.load(f)
            except (OSError, json.JSONDecodeError) as err:
                raise UsageError(f"arguments file {argv[0]!r} could not be read as JSON ({err})") from None
            if isinstance(given.get("teacher"), list):  # "teacher": ["A", "B"]: several teachers
                given["teacher"], given["other_teachers"] = given["teacher"][0], ",".join(given["teacher"][1:])
            glue, args = parser.parse_dict(given)
            has_output = "output_dir" in given
        else:
            from .teachers import gather_teacher_flags

            argv = gather_teacher_flags(argv)  # --teacher A --teacher B: several teachers
            glue, args = parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)
            has_output = any(a.split("=")[0] in ("--output_dir", "--output-dir") for a in argv)
    except ValueError as err:  # TrainingArguments' own checks (e.g. --bf16 on a CPU without --use_cpu)
        message = str(err).splitlines()[0]
        if message.startswith("Some specified arguments are not used"):
            message = f"unknown arguments {message.split(': ', 1)[-1]} (see glue-eval --help)"
        raise UsageError(message) from None
    if not has_output:
        raise UsageError("--output_dir is required: results go to OUT/<task>/<cell>/result.json")
    if not glue.model:
        raise UsageError("--model is required: a model folder (e.g. a distilled student) or a hub id")
    from .grid import AXIS_RULES, axis_value_ok

    if not axis_value_ok("max_seq_length", glue.max_seq_length):  # the grid file's rule for the same setting
        raise UsageError(f"--max_seq_length {glue.max_seq_length} {AXIS_RULES['max_seq_length']}")
    return glue, args


def _main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "report":
        return _report(argv[1:])
    if any(a.split("=")[0] == "--backend" for a in argv):  # evaluate a fine-tuned folder, torch and ONNX side by side
        from .backends import main as evaluate_backends

        return evaluate_backends(argv)
    if any(a.split("=")[0] == "--multitask" for a in argv):  # one student, many tasks (docs/multitask.md)
        from .multitask.run import main as run_multitask

        return run_multitask(argv)
    glue, args = _parse(argv)

    from .arguments import apply_precision, precision_check
    from .grid import load_grid, plan, run_grid

    args, precision_line = apply_precision(glue, args)  # the line is printed when training starts
    precision_check(args)
    if not glue.task and not glue.grid:
        raise UsageError("--task is required: a GLUE task name, 'all', or a task spec .json (or give --grid)")
    grid = load_grid(glue.grid) if glue.grid else {}
    tasks, cells, base, glue = plan(grid, args, glue)
    from .distillation import check_task_stage

    check_task_stage(glue, tasks)  # --teacher, --stages, --augment, --unlabelled_file: before anything loads
    from .qa_finetune import check_qa_run

    check_qa_run(glue, args, tasks)  # extractive QA's own settings
    from .distillation import run_stages
    from .teachers import check_teachers

    weights = {qa: [s["weights"] for t in tasks if glue.teacher and t.is_qa == qa for s in run_stages(glue, t)]
               for qa in (False, True)}  # sentence tasks' stages, extractive QA's
    check_teachers(glue, weights[False], weights[True])
    records = run_grid(tasks, cells, base, glue, args.output_dir, announce=precision_line)
    for r in records:
        parts = ", ".join(f"{split} " + " ".join(f"{k} {100 * v:.1f}" for k, v in m.items())
                          for split, m in r["dev"].items())
        print(f"{r['task']} {r['cell']}: {parts}")
    print(f"results: {args.output_dir}/results.jsonl (glue-eval report {args.output_dir} for the table)")
    return 0


def _report(argv: list[str]) -> int:
    from .report import build_report

    parser = ArgumentParser(prog="glue-eval report", description="Markdown table + PNG of a glue-eval output folder.")
    parser.add_argument("out", help="the --output_dir of glue-eval runs (a grid or single runs)")
    parser.add_argument("--teacher_results", default=None,
                        help="the teacher's glue-eval output folder, shown side by side")
    ns = parser.parse_args(argv)
    md, png = build_report(ns.out, ns.teacher_results)
    print(f"wrote {md} and {png}")
    return 0


main = cli_entry(_main)
