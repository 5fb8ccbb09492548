"""The mpnet study's own pieces (``python -m bench.study --study mpnet``; bench/study.py runs it): frozen-embedding
scores per model (embed-eval, MTEB's protocol), inference speed per student architecture, and the report
docs/study-mpnet.md with its columns, its targets and what is left of a partial run.

The teacher is the 12-layer, 768-wide all-mpnet-base-v2; students keep 4 of its layers (1,5,8,12, the seed
report's; 3,6,9,12) or 6 (2,4,6,8,10,12). Students of different depths run at different speeds, so the speed-up
is measured per architecture (and per outside reference), not once as in the minilm study.
"""

from __future__ import annotations

import functools
import json
import math
import os
import statistics
from pathlib import Path

from bench import carry, study

# The distillation budget, and why (the run's own minutes, and what is left at those rates: time_lines)
BUDGET_NOTE = (
    "150 steps of 16 x 128 tokens (307k tokens) a distilled row, sized so that the whole study (18 rows, 3 seeds, "
    "the frozen-embedding scores) fits 8 hours on 2 cores: fine-tuning at docs/study.md's settings (kept, so the "
    "two studies compare) costs most of it. `--distill_steps N` scales the budget (a distillation's minutes grow with it)")
PENDING = "pending"


# --- frozen embeddings ------------------------------------------------------------------------------

def embed_folder(row: dict, ns) -> str:
    return os.path.join(ns.work_dir, "embed", row["name"])


def embeds_row(row: dict) -> bool:
    """A row whose model is one frozen encoder (a task-KD row is a set of task-fine-tuned classifiers)."""
    return not row.get("task_kd")


def embed_scores(row: dict, ns) -> dict | None:
    """The row's embed-eval record (``{"scores", "averages"}``), cached under the work dir; None when not done."""
    path = os.path.join(embed_folder(row, ns), "embed_eval.json")
    if not os.path.isfile(path):
        return getattr(ns, "carried", carry.EMPTY)["embed"].get(row["name"])
    (model,) = json.loads(Path(path).read_text(encoding="utf-8"))["models"]
    return {"scores": model["scores"], "averages": model["averages"]}


def run_embed_eval(row: dict, ns) -> None:
    """Score the row's frozen model with embed-eval (glue_eval.embedding; MTEB's evaluators) unless done
    (:func:`embed_unavailable` says whether it can run here)."""
    if not embeds_row(row) or embed_scores(row, ns) is not None:
        return None
    from glue_eval import embedding

    args = embedding.build_parser().parse_args(
        ["--model", study.model_folder(row, ns), "--output_dir", embed_folder(row, ns), "--data_dir", ns.cache_dir,
         "--overwrite", *(["--n_experiments", "2", "--samples_per_label", "4", "--max_seq_length", "64", "--max_dev", "160"]
                          if ns.quick else [])])  # quick: 160 dev examples a task, cut to 64 tokens
    study.log(f"frozen-embedding scores of {row['name']}")
    embedding.write(embedding.run(args), args.output_dir, overwrite=True)


# --- speed per architecture ---------------------------------------------------------------------------

def depth(row: dict) -> int | None:
    return len(row["layers"].split(",")) if row.get("layers") else None


def cost_scale(row: dict, rows, params: dict) -> float | None:
    """A row's non-embedding parameters, or those of a student of the same depth (fine-tuning and encoding costs
    scale with them; the embeddings are a lookup)."""
    same = [r["name"] for r in rows if r["name"] == row["name"] or (depth(row) and r["kind"] in ("student", "random")
                                                                    and depth(r) == depth(row))]
    found = [params[n]["non_embedding"] for n in same if n in params]
    if found or not depth(row):
        return found[0] if found else None
    # no student of this depth made yet: one of another depth, in proportion (same width, layers alike)
    other = next((r for r in rows if r["kind"] == "student" and depth(r) and r["name"] in params), None)
    return params[other["name"]]["non_embedding"] * depth(row) / depth(other) if other else None


def time_lines(summary, rows, state: dict, params: dict, ns) -> list[str]:
    """The minutes this run measured, and what is left at those rates: fine-tuning a (row, seed) and the frozen
    scores in proportion to the row's non-embedding parameters, a distillation as the mean measured one (the
    teacher's forward plus three student passes a layer, in proportion)."""
    timings = state.get("timings", {})
    left_cells = {r["name"]: len(ns.seed_list) - len(r["seeds"]) for r in summary}
    by_row = {r["name"]: r for r in rows}
    plain = [(timings[f"finetune {r['name']} seed {s}"], cost_scale(r, rows, params)) for r in rows
             for s in ns.seed_list if not r.get("task_kd") and f"finetune {r['name']} seed {s}" in timings]
    plain = [(t, c) for t, c in plain if c]
    frozen = [(timings[f"frozen {r['name']}"], cost_scale(r, rows, params)) for r in rows if f"frozen {r['name']}" in timings]
    frozen = [(t, c) for t, c in frozen if c]
    units = lambda r: 12 + 3 * len(r["layers"].split(","))  # noqa: E731 - teacher forward + student passes
    distilled = [r for r in rows if r["kind"] == "student" and r["objective"] != "none" and not r.get("task_kd")]
    done_d = [(timings[f"prepare {r['name']}"], units(r)) for r in distilled if f"prepare {r['name']}" in timings]
    if not plain:
        return []
    ft_rate = sum(t for t, _ in plain) / sum(c for _, c in plain)
    fz_rate = sum(t for t, _ in frozen) / sum(c for _, c in frozen) if frozen else None
    d_rate = sum(t for t, _ in done_d) / sum(u for _, u in done_d) if done_d else None
    kd_open = [n for n, k in left_cells.items() if k and by_row[n].get("task_kd")]
    kd_seed = {n: [timings[f"finetune {n} seed {s}"] for s in ns.seed_list if f"finetune {n} seed {s}" in timings]
               for n in kd_open}  # a task-KD row's seed: its own measured minutes (an augmented set, a teacher)
    kd_left = sum(left_cells[n] * statistics.median(t) for n, t in kd_seed.items() if t)
    kd_untimed = [n for n, t in kd_seed.items() if not t]
    ft_left = sum(k * ft_rate * (cost_scale(by_row[n], rows, params) or 0) for n, k in left_cells.items()
                  if k and not by_row[n].get("task_kd"))
    d_left = sum(d_rate * units(r) for r in distilled if f"prepare {r['name']}" not in timings) if d_rate else 0.0
    fz_left = sum(fz_rate * (cost_scale(by_row[r["name"]], rows, params) or 0) for r in summary
                  if embeds_row(r) and r["embed"] is None) if fz_rate else 0.0
    four = next((cost_scale(r, rows, params) for r in rows if depth(r) == 4), None)
    teacher = params.get("teacher", {}).get("non_embedding")
    figures = [f"fine-tuning a seed {ft_rate * four / 60:.1f} min for a 4-layer student" if four else "",
               f"{ft_rate * teacher / 60:.1f} for the teacher" if teacher else "",
               f"a 4-layer distillation {d_rate * 24 / 60:.1f} min" if d_rate else "",
               f"frozen-embedding scores {fz_rate * four / 60:.1f} min for a 4-layer student" if fz_rate and four else ""]
    spent = sum(v for k, v in timings.items() if k.split(" ")[1] in by_row)
    threads = state.get("torch_threads")
    return [f"- Time, at the rates measured for this table's cells (wall clock, {threads or '?'} torch threads in "
            f"the latest run; a shared machine, and carried cells' own machines, show in it): {', '.join(x for x in figures if x)}. Spent so far {spent / 3600:.1f} h; left about "
            f"{(ft_left + d_left + fz_left + kd_left) / 3600:.1f} h (fine-tuning {ft_left / 3600:.1f}, distillation "
            f"{d_left / 3600:.1f}, frozen scores {fz_left / 3600:.1f}"
            + (f", task-KD fine-tuning {kd_left / 3600:.1f}" if kd_left else "")
            + (f"; the task-KD rows, {len(kd_untimed)}, not included until one is timed" if kd_untimed else "")
            + (")" if d_rate and fz_rate else "; what no run has timed yet is not included)") + "."]


def arch_key(folder: str) -> str:
    """``LAYERSxWIDTH`` of a model folder: rows of one architecture share one speed figure."""
    config = json.loads(Path(folder, "config.json").read_text(encoding="utf-8"))
    return f"{config['num_hidden_layers']}x{config['hidden_size']}"


def measure_speeds(rows, ns, state: dict, again: bool = False) -> None:
    """``state["speeds"][arch]``: the teacher against one model of each architecture (students, the floor, the
    references), fp32, batch 32 and 1 (:func:`bench.study.measure_speed`); saved figure by figure."""
    speeds = state.setdefault("speeds", {})
    teacher = study.teacher_path(ns)
    measured = set()
    for row in rows:
        if row["kind"] == "teacher" or row.get("task_kd"):
            continue
        folder, _ = study.prepare_model(row, ns) if row["kind"] != "student" or row["objective"] == "none" else (
            study.model_folder(row, ns), 0.0)
        if not os.path.isfile(os.path.join(folder, "config.json")):
            continue
        key = arch_key(folder)
        if key in measured or (key in speeds and not again):
            continue
        study.log(f"measuring inference speed: teacher against {key} ({row['name']})")
        speeds[key] = {**study.measure_speed(teacher, folder, ns.quick), "machine": carry.machine_here()}
        measured.add(key)
        study.save_state(ns, state)


@functools.lru_cache(maxsize=4)
def teacher_width(folder: str) -> int:
    """The teacher's hidden size, read once (every row of every report asks)."""
    return json.loads(Path(folder, "config.json").read_text(encoding="utf-8"))["hidden_size"]


def row_speed(row: dict, ns, speeds: dict) -> dict | None:
    if row["kind"] == "teacher":
        return {"batch1": {"speedup_median": 1.0}, "batch32": {"speedup_median": 1.0}}
    folder = study.model_folder(row, ns)
    if os.path.isfile(os.path.join(folder, "config.json")):
        return speeds.get(arch_key(folder))
    if row["kind"] in ("student", "random") and row.get("layers"):  # not made here (its cells carried): a copy of
        # the teacher's layers, so its architecture is the layer count at the teacher's width
        return speeds.get(f"{len(row['layers'].split(','))}x{teacher_width(study.teacher_path(ns))}")
    return None


def embed_unavailable(ns) -> str | None:
    """Why embed-eval cannot score here (not in this checkout, mteb missing, the study's data not prepared), or
    None."""
    try:
        from glue_eval import embedding
    except ImportError as e:
        return f"embed-eval is not in this checkout ({e})"
    try:
        embedding._mteb()
        embedding.load_data(ns.cache_dir)
    except Exception as e:  # embed-eval's one-line errors: the install command, the missing file and its command
        return str(e)
    return None


def score_frozen(row: dict, ns) -> None:
    """The row's frozen-embedding scores as soon as its model exists (so a partial report has them), when
    embed-eval can run here (the reason it cannot is logged once)."""
    if not hasattr(ns, "embed_why"):
        ns.embed_why = embed_unavailable(ns)
        if ns.embed_why:
            study.log(f"frozen-embedding scores left pending: {ns.embed_why}")
    if not ns.embed_why:
        run_embed_eval(row, ns)


def finish(rows, ns, state: dict) -> None:
    """The run's last phase: speeds (unless --skip_speed) and the frozen-embedding scores of every model made."""
    if not ns.skip_speed:
        measure_speeds(rows, ns, state)
    why = embed_unavailable(ns)
    if why:
        study.log(f"frozen-embedding scores left pending: {why}")
        return
    for row in rows:
        folder = study.model_folder(row, ns)
        if os.path.isfile(os.path.join(folder, "config.json")) or row["kind"] in ("teacher", "reference"):
            run_embed_eval(row, ns)


# --- the report -----------------------------------------------------------------------------------------

def add_columns(summary, rows, ns, speeds: dict) -> None:
    """Each summary row gains ``embed`` (its embed-eval averages, or None), ``embed_retained`` (% of the
    teacher's frozen-embedding average) and ``speed`` (speed-ups at batch 1 and 32, or None)."""
    by_name, row_of = {r["name"]: r for r in summary}, {r["name"]: r for r in rows}  # summary rows have no path
    for r in summary:
        rec = embed_scores(r, ns) if embeds_row(r) else None
        r["embed"] = rec["averages"] if rec else None
        sp = row_speed(row_of[r["name"]], ns, speeds)
        r["speed"] = None if sp is None else {b: sp[b]["speedup_median"] for b in ("batch1", "batch32")}
    teacher = by_name.get("teacher", {}).get("embed")
    for r in summary:
        r["embed_retained"] = (100 * r["embed"]["average"] / teacher["average"]) if r["embed"] and teacher else None


def embed_cell(r: dict) -> str:
    if not embeds_row(r):
        return "–"
    e = r["embed"]
    if e is None:
        return PENDING
    return (f"{100 * e['average']:.1f} ({100 * e.get('classification', 0):.1f} / {100 * e.get('clustering', 0):.1f}"
            f" / {100 * e.get('retrieval', 0):.1f})")


def speed_source(speeds: dict) -> str:
    """Where and at how many threads the speed-ups were measured ('' before any was)."""
    def threads(n) -> str:
        return f"{n} torch thread" + ("" if n == 1 else "s")

    where = sorted({f"{v.get('machine', 'this machine')}, {threads(v.get('threads', '?'))}"
                    for v in speeds.values() if isinstance(v, dict)})
    if len(where) > 1:
        return (f" Measured on more than one machine ({'; '.join(where)}): compare speed-ups across rows only after "
                "`--remeasure_speed` takes them all on one.")
    return f" Measured on {where[0]}." if where else ""


def table_lines(summary, tasks, params, speeds: dict | None = None) -> list[str]:
    """The results table, one row per model, and what its columns are."""
    head = ["model", "n", *[t.name for t in tasks], "fine-tuned avg", "% of teacher",
            "frozen-embedding avg (class. / clust. / retr.)", "% of teacher", "params (M)", "speed-up b1",
            "speed-up b32", "distil min (tokens)", "fine-tune min/seed"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in summary:
        p, sp = params.get(r["name"]), r["speed"]
        retained = "–" if r["retained"] is None else (
            f"{r['retained']:.1f}" + (f" ± {r['retained_std']:.1f}" if len(r["seeds"]) > 1 else ""))
        cells = [r["label"], str(len(r["seeds"])), *[study.fmt(r["scores"][t.name]) for t in tasks],
                 study.fmt(r["avg_by_seed"]), retained, embed_cell(r),
                 "–" if r["embed_retained"] is None else f"{r['embed_retained']:.1f}",
                 f"{p['total'] / 1e6:.1f}" if p else "–",
                 f"{sp['batch1']:.2f}" if sp else PENDING, f"{sp['batch32']:.2f}" if sp else PENDING,
                 *study.fmt_compute(r["compute"])]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + ["", "Fine-tuned scores: each task's dev accuracy in %, mean ± standard deviation over the seeds "
                    "(n: seeds done); the average is per seed, then over seeds; % of teacher against the teacher on "
                    "the same seeds. Frozen-embedding average: embed-eval (MTEB's protocol and evaluators, no "
                    "fine-tuning): the mean of the classification (polarity, uncertainty, BBC topics: accuracy), "
                    "clustering (BBC: V-measure) and retrieval (BBC titles -> bodies: nDCG@10) means, x 100; a "
                    "task-KD row is a set of fine-tuned classifiers and has none. Speed-up: the bare encoder against "
                    "the teacher, torch fp32, seq 128, median of interleaved repeats, per architecture."
                    + speed_source(speeds or {}) + " Compute: "
                    "wall clock on this (shared) machine, distillation minutes and tokens, fine-tuning minutes a "
                    "seed over all tasks."]


def cells_left(summary, rows, ns) -> tuple[int, int, list[str]]:
    """(cells done, cells asked, labels of the rows not finished) over row x seed (every task of a seed)."""
    asked = len(summary) * len(ns.seed_list)
    done = sum(len(r["seeds"]) for r in summary)
    left = [f"{r['label']} ({n} seed{'s' * (n != 1)})" for r in summary
            if (n := len(ns.seed_list) - len(r["seeds"])) > 0]
    return done, asked, left


def loose_cells(summary, results: dict) -> str:
    """The finished single-task cells of seeds not finished on every task (the table counts whole seeds only)."""
    labels = {r["name"]: r["label"] for r in summary}
    whole = {(r["name"], s) for r in summary for s in r["seeds"]}
    parts = [f"{labels[name]}, seed {seed}: {', '.join(f'{t} {100 * v:.1f}' for t, v in scores.items())}"
             for (name, seed), scores in results.items() if (name, seed) not in whole and name in labels]
    return ("Finished cells of seeds not yet whole (dev accuracy %): " + "; ".join(parts) + ". ") if parts else ""


def status_lines(summary, rows, ns, command: str, cells: tuple[int, int], results: dict) -> list[str]:
    """What is done and what is left (``cells``: task cells done and asked), and the command that continues the
    run."""
    done, asked, left = cells_left(summary, rows, ns)
    embed_left = [r["label"] for r in summary if embeds_row(r) and r["embed"] is None]
    speed_left = sorted({r["label"] for r in summary if r["speed"] is None})
    if not left and not embed_left and not speed_left:
        return ["**Status: complete.**", ""]
    return ["**Status: partial.** " + f"{done} of {asked} (row, seed) fine-tuning runs done (every task of a seed; "
            f"{cells[0]} of {cells[1]} single-task cells). " + loose_cells(summary, results) +
            f"Left: {'; '.join(left) or 'none'}. Frozen-embedding scores pending for {len(embed_left)} rows; speed "
            f"not measured yet for {len(speed_left)} rows (frozen scores are taken as each model's first seed "
            "finishes, speed after all the fine-tuning or at once with `--remeasure_speed`). The run continues "
            "where it stopped (finished cells, distilled students and checkpoints are cached under the work dir) "
            "with:", "", "```", command, "```", ""]


def write_report(ns, rows, tasks, results, state: dict, command: str) -> None:
    """docs/study-mpnet.md (status, set-up, table, findings), .json (every figure) and .png."""
    from distill.common.io import atomic_write_text

    summary = study.summarise(rows, tasks, results, ns.seed_list)
    timings = state.get("timings", {})
    for r in summary:
        r["compute"] = study.row_compute(r, timings, ns)
    add_columns(summary, rows, ns, state.get("speeds", {}))
    params = study.params_of(rows, ns, state)
    own = study.row_timings(rows, timings)
    projection = (study.projected_run(rows, own, state["distill_speed"], ns) if state.get("distill_speed")
                  else None)
    mode = "QUICK MODE (a smoke test of the pipeline, not a result)" if ns.quick else "full run"
    lines = ["# Distillation study, 12 layers into 4: all-mpnet-base-v2 (12 layers, 768 wide) into 4- and 6-layer "
             "students", ""] + status_lines(summary, rows, ns, command,
                                          (sum(len(v) for v in results.values()),
                                           len(rows) * len(ns.seed_list) * len(tasks)), results)
    lines += study.report_title(ns, mode, command)[2:]
    lines += study.setup_lines(ns, tasks, summary) + [f"- Budget: {BUDGET_NOTE}"]
    if getattr(ns, "extra_objectives", ""):
        lines += [f"- Rows beyond the study's own, run after all of them (--extra_objectives): "
                  f"{', '.join(ns.extra_objective_list)} on layers {ns.inits[0]}"
                  + ("; hid_mse+att_mse+sent_mse@cal is the shipped recipe's terms "
                     "(student_configs/mpnet_4l_1-5-8-12.json), weighted by distill-train --calibrate as it was"
                     if "hid_mse+att_mse+sent_mse@cal" in ns.extra_objective_list else "")]
    if carry.note(getattr(ns, "carried", carry.EMPTY)):
        lines += [f"- Carried: {carry.note(ns.carried)}"]
    lines += [x for x in study.method_lines(ns, rows, None, own, projection) if not x.startswith("- Speed")]
    lines += time_lines(summary, rows, state, params, ns) + [""]  # a table needs a blank line above it
    lines += table_lines(summary, tasks, params, state.get("speeds", {}))
    lines += ["", "## Findings (computed from the table)", ""]
    lines += [f"- {x}" for x in findings(summary, ns)] + ["", f"![study]({Path(ns.out).name}.png)", ""]
    out = Path(ns.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(str(out) + ".md", "\n".join(lines))
    atomic_write_text(str(out) + ".json", json.dumps({
        "study": ns.study, "mode": "quick" if ns.quick else "full", "command": command,
        "settings": study.report_settings(ns), **carry.json_fields(results, ns),
        "embed_records": {r["name"]: rec for r in rows if (rec := embed_scores(r, ns))},
        "machine": study.machine_description(), "rows": summary, "params": params, "speeds": state.get("speeds"),
        "timings_s": own, "projected_run": projection, "budget": BUDGET_NOTE,
    }, indent=2, default=str) + "\n")
    study.plot(summary, Path(str(out) + ".png"), ns, mode)
    study.log(f"wrote {out}.md, {out}.png, {out}.json")


# --- findings -------------------------------------------------------------------------------------------

def distilled_rows(summary, layers: str) -> list[dict]:
    """The task-agnostic distilled rows of one initialisation with a share of the teacher's fine-tuned average (a
    row whose seeds the teacher lacks has an average but no share yet)."""
    return [r for r in summary if r["kind"] == "student" and r["layers"] == layers and r["objective"] != "none"
            and not r.get("task_kd") and r["retained"] is not None]


def verdict(ns, met: bool, short: str) -> str:
    return study.verdict(ns, met, short)


def target_agnostic(by: dict, summary, ns) -> list[str]:
    """Targets 1 and 2: the best task-agnostic 4L 1,5,8,12 row's shares and speed; its gain over copying. The
    best row is the one of highest fine-tuned share among those that meet all of target 1, else among all (so
    "not met" says that no row meets it)."""
    first = ns.inits[0]
    cands = distilled_rows(summary, first)
    if not cands:
        return [f"Targets on layers {first}: no distilled row finished yet."]

    def meets(r: dict) -> bool:
        return (r["retained"] >= 97 and (r["embed_retained"] or 0) >= 95
                and ((r["speed"] or {}).get("batch32") or 0) >= 2.8)

    best = max([r for r in cands if meets(r)] or cands, key=lambda r: r["retained"])
    sp = (best["speed"] or {}).get("batch32")
    emb = best["embed_retained"]
    met = meets(best)
    lines = [f"Target (best task-agnostic {first} row >= 97% of the teacher fine-tuned, >= 95% frozen, >= 2.8x at "
             f"batch 32): {best['label']} at {best['retained']:.1f}% ± {best['retained_std']:.1f} fine-tuned, "
             + (f"{emb:.1f}% frozen" if emb is not None else "frozen pending") + ", "
             + (f"{sp:.2f}x" if sp else "speed pending")
             + (": pending." if emb is None or sp is None else verdict(ns, met, shortfall(best["retained"], emb, sp)))]
    base = by.get(f"{study.init_name(first)}_none")
    if base and base["avg"] is not None:
        gain = best["retained"] - base["retained"]
        paired = study.paired_gain(best, base, next(r for r in summary if r["kind"] == "teacher"))
        matched = bool(paired) and set(paired) != set(best["seeds"]) | set(base["seeds"])
        if matched:  # the rows' seeds differ: judged seed against seed on the seeds both have
            gain = statistics.mean(paired.values())
        spread = f" ± {statistics.stdev(paired.values()):.1f}" if len(paired) > 1 else ""
        how = (f"seed against seed on {study.seeds_text(paired)}, which both rows have; each row over its own "
               f"seeds: {best['retained']:.1f}% against {base['retained']:.1f}%" if matched else
               f"{best['retained']:.1f}% against {base['retained']:.1f}%")
        e_gain = (best["embed_retained"] - base["embed_retained"]) if (
            best["embed_retained"] is not None and base["embed_retained"] is not None) else None
        lines.append(f"Target (distillation beats copying and fine-tuning only, layers {first}, by >= 3 points "
                     f"fine-tuned and >= 10 frozen): {gain:+.1f}{spread} points fine-tuned ({how}), "
                     + (f"{e_gain:+.1f} frozen" if e_gain is not None else "frozen pending")
                     + (": pending." if e_gain is None else verdict(ns, gain >= 3 and e_gain >= 10, " / ".join(
                         x for x in (f"{3 - gain:.1f} points fine-tuned" if gain < 3 else "",
                                     f"{10 - e_gain:.1f} frozen" if e_gain < 10 else "") if x))))
    return lines


def shortfall(kept: float, frozen: float, speed: float) -> str:
    """What target 1 lacks: points of the teacher's fine-tuned and frozen averages, speed-up at batch 32."""
    parts = [f"{97 - kept:.1f} points fine-tuned" if kept < 97 else "", f"{95 - frozen:.1f} frozen" if frozen < 95
             else "", f"{2.8 - speed:.2f}x speed" if speed < 2.8 else ""]
    return " / ".join(p for p in parts if p)


def target_minilm(summary, ns) -> list[str]:
    """Target 3: the best 4-layer student's frozen-embedding average against all-MiniLM-L6-v2's."""
    ref = next((r for r in summary if r["kind"] == "reference" and "all-MiniLM-L6" in r["label"]), None)
    four = [r for r in summary if r["kind"] == "student" and len(r["layers"].split(",")) == 4 and r["embed"]]
    if not ref or not ref["embed"] or not four:
        return ["Target (best 4-layer student's frozen-embedding average >= all-MiniLM-L6-v2's): pending (frozen "
                "scores not taken yet)."]
    best = max(four, key=lambda r: r["embed"]["average"])
    gap = 100 * (best["embed"]["average"] - ref["embed"]["average"])
    speeds = ", ".join(f"{x['label']}: {x['speed']['batch32']:.2f}x at batch 32" for x in (best, ref) if x["speed"])
    # a 4-layer row still to be scored may yet meet it: "met" stands, "not met" is so far
    pending = sum(1 for r in summary if r["kind"] == "student" and len(r["layers"].split(",")) == 4
                  and not r.get("task_kd") and r["embed"] is None)
    return [f"Target (best 4-layer student's frozen-embedding average >= all-MiniLM-L6-v2's): {best['label']} "
            f"{100 * best['embed']['average']:.1f} against {100 * ref['embed']['average']:.1f} ({gap:+.1f})"
            + (f" ({speeds})" if speeds else "")
            + (f": not met so far (short by {-gap:.1f}; {pending} 4-layer rows' frozen scores pending)."
               if pending and gap < 0 and not ns.quick else verdict(ns, gap >= 0, f"{-gap:.1f}"))]


def init_question(by: dict, ns, teacher: dict) -> list[str]:
    """The report's own question: 1,5,8,12 or 3,6,9,12, per objective, with the spread over the same seeds; then
    the answer: each layer set's best row against the other's, seed against seed."""
    a, b = ns.inits[0], "3,6,9,12"
    if b not in ns.inits:
        return []
    parts = []
    for o in dict.fromkeys(ns.objective_list + ns.other_objective_list):
        ra, rb = by.get(f"{study.init_name(a)}_{o}"), by.get(f"{study.init_name(b)}_{o}")
        if not (ra and rb and ra["avg"] is not None and rb["avg"] is not None):
            continue
        common = [s for s in ra["seeds"] if s in rb["seeds"]]
        diffs = [ra["avg_by_seed"][ra["seeds"].index(s)] - rb["avg_by_seed"][rb["seeds"].index(s)] for s in common]
        if diffs:
            spread = f" ± {statistics.stdev(diffs):.1f}" if len(diffs) > 1 else " (one seed: spread not measured)"
            parts.append(f"{o if o != 'none' else 'fine-tuned only'} {statistics.mean(diffs):+.1f}{spread}")
    if not parts:
        return [f"Layers {a} against {b}: pending (no objective finished on both)."]
    return [f"Layers {a} against {b} (fine-tuned average, points, {a} minus {b}, mean ± std of the per-seed "
            "differences): " + "; ".join(parts) + "."] + init_answer(by, ns, teacher, a, b)


def init_answer(by: dict, ns, teacher: dict, a: str, b: str) -> list[str]:
    """Which layer set is better: the best row of each over the objectives (fine-tuned only included) both sets
    have finished, in points of the teacher's average, mean ± std of the per-seed gains; settled only when the
    mean gain's 95% interval (Student's t over the seeds) leaves out 0."""
    objectives = [o for o in study.objectives_of(b, ns) if o in study.objectives_of(a, ns)]
    done = [o for o in objectives if all((r := by.get(f"{study.init_name(x)}_{o}")) and r["retained"] is not None
                                         for x in (a, b))]
    best = {x: max((by[f"{study.init_name(x)}_{o}"] for o in done), key=lambda r: r["retained"], default=None)
            for x in (a, b)}
    pending = len(objectives) - len(done)
    gains = study.paired_gain(best[a], best[b], teacher) if best[a] and best[b] else {}
    if not gains:
        return []
    mean = statistics.mean(gains.values())
    spread = statistics.stdev(gains.values()) if len(gains) > 1 else None
    winner = a if mean > 0 else b
    if spread is None:
        how = "one seed: spread not measured"
    else:  # the mean gain's 95% interval, Student's t over the seeds
        from scipy.stats import t

        half = t.ppf(0.975, len(gains) - 1) * spread / math.sqrt(len(gains))
        interval = f"95% interval {mean - half:+.1f} to {mean + half:+.1f}"
        how = (f"{winner} is better ({interval})" if abs(mean) > half else
               f"{winner} ahead, but the {interval} holds 0: not settled")

    def named(r: dict) -> str:
        return f"{'fine-tuned only' if r['objective'] == 'none' else r['objective']}, {r['retained']:.1f}%"

    return [f"Which layers: the best row of each, {a} ({named(best[a])}) against {b} ({named(best[b])}): "
            f"{mean:+.1f}" + (f" ± {spread:.1f}" if spread is not None else "")
            + f" points of the teacher's average, seed against seed on {study.seeds_text(gains)}: "
            + how + (f" (so far: {pending} of {len(objectives)} objectives not finished on both)" if pending else "")
            + "."]


def kd_base_line(summary, ns) -> list[str]:
    """Whether each task-KD row starts from its init's best task-agnostic row ("the best of these"): the base is
    chosen before the run (hid_mse+att_mse, the last study's best), so the table checks the choice."""
    lines = []
    for r in (r for r in summary if r.get("task_kd")):
        cands = distilled_rows(summary, r["layers"])
        if not cands:
            continue
        best = max(cands, key=lambda c: c["retained"])
        if best["objective"] == r["objective"]:
            lines.append(f"The task-KD row of layers {r['layers']} starts from its best task-agnostic row "
                         f"({r['objective']}), as the study plans (the best of them, then task distillation).")
        else:
            lines.append(f"The task-KD row of layers {r['layers']} starts from {r['objective']}, but {best['objective']} "
                         f"is the best task-agnostic row ({best['retained']:.1f}%): rerun that row with --task_kd "
                         f"{r['layers']}:{best['objective']}:{'+'.join(r['task_kd'])}:aug.")
    return lines


def findings(summary, ns) -> list[str]:
    by = {f"{study.init_name(r['layers'])}_{r['objective']}": r for r in summary
          if r["kind"] == "student" and not r.get("task_kd")}
    if not any(r["kind"] == "teacher" and r["avg"] is not None for r in summary):
        return ["The teacher has no finished cells yet: no comparison possible."]
    teacher = next(r for r in summary if r["kind"] == "teacher")
    lines = study.gain_lines(by, ns, teacher) + init_question(by, ns, teacher) + study.task_kd_lines(summary, by, teacher)
    lines += kd_base_line(summary, ns)
    lines += target_agnostic(by, summary, ns) + target_minilm(summary, ns)
    for r in summary:
        if r["kind"] in ("random", "reference") and r["avg"] is not None:
            lines.append(f"{r['label']}: {r['retained']:.1f}% of the teacher's fine-tuned average.")
    return lines
