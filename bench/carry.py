"""Finished cells carried from a study's committed report into a run on another machine.

A study (bench.study, bench.study_multitask) runs for longer than a machine may be held: its work dir (finished
cells, distilled students) stays behind when the machine goes. Its committed report (``OUT.json``) lists every
finished cell with the machine that made it, so a run whose settings are the report's reads the cells its own work
dir lacks from there and does not redo them: each (row, seed, task) score, the frozen-embedding scores of a row, the
minutes each piece took, the parameter counts and (the MPNet study's, per architecture) the inference speed-ups,
each naming the machine that measured it (``--remeasure_speed`` takes them all again on one machine). A cell
finished in the work dir wins over a carried one. Nothing is carried when a setting that changes a result differs
(the report's one line says which); the report says how many of its cells were carried, and from which machines.

A row that fine-tunes against the teacher's models of a seed (task KD) needs those models, which a report does not
hold: the teacher's cells of that seed are then made again here, not carried.
"""

from __future__ import annotations

import json
import os

# settings that change no cell's result: where things go, what to measure again, which seeds to run now
IGNORED = frozenset({"out", "report_only", "prepare", "remeasure_speed", "remeasure_distill", "skip_speed", "seeds",
                     "seed_list", "data_cache", "cache_dir", "work_dir", "embed_why", "carried", "no_carry",
                     # rows added after the others: a cell is its own row's (named by its init and objective)
                     "extra_objectives", "extra_objective_list"})
EMPTY = {"cells": {}, "embed": {}, "timings": {}, "params": {}, "speeds": {}, "machine_of": {}, "source": None,
         "count": 0}


def report_cells(results: dict, carried: dict | None = None, here: str | None = None) -> list[dict]:
    """``results`` ((row, seed) -> {task: score}) as the report's ``cells`` list, sorted, each with the machine
    that made it: a carried cell its own, a cell made here ``here``."""
    made = (carried or {}).get("machine_of", {})
    used = (carried or {}).get("used", set())
    return [{"row": name, "seed": seed, "task": task, "score": score,
             "machine": made.get((name, seed, task)) if (name, seed, task) in used else here}
            for (name, seed), scores in sorted(results.items()) for task, score in sorted(scores.items())]


def _cells_of(report: dict) -> dict:
    """(row, seed) -> {task: score} from a report: its ``cells``, or (reports written before the list existed) the
    rows' whole seeds, whose scores are in % and in the order of the row's ``seeds``."""
    out = {}
    if "cells" in report:
        for c in report["cells"]:
            out.setdefault((c["row"], int(c["seed"])), {})[c["task"]] = float(c["score"])
        return out  # each cell's machine: _machines_of
    for row in report.get("rows", []):
        for i, seed in enumerate(row.get("seeds", [])):
            out[(row["name"], int(seed))] = {task: vals[i] / 100 for task, vals in row.get("scores", {}).items()}
    return out


def _machines_of(report: dict, cells: dict) -> dict:
    """(row, seed, task) -> the machine that made the cell: as the report lists it, else (reports written before
    cells named theirs) the first machine the report names: the earliest of its ``earlier_machines``, or its own."""
    first = (report.get("earlier_machines") or [report.get("machine")])[0]
    default = _machine(first) if isinstance(first, dict) else "an earlier machine"
    listed = {(c["row"], int(c["seed"]), c["task"]): c.get("machine") for c in report.get("cells", [])}
    return {(name, seed, task): listed.get((name, seed, task)) or default
            for (name, seed), scores in cells.items() for task in scores}


def _embed_of(report: dict) -> dict:
    """Row -> embed-eval record (``{"scores", "averages"}``); a report without the records gives the averages."""
    if "embed_records" in report:
        return dict(report["embed_records"])
    return {r["name"]: {"scores": None, "averages": r["embed"]} for r in report.get("rows", []) if r.get("embed")}


def _speeds_of(report: dict) -> dict:
    """Architecture -> speed-ups, each naming its machine (one measured before speeds named theirs: the report's)."""
    own = report.get("machine")
    default = _machine(own) if isinstance(own, dict) else "an earlier machine"
    return {arch: {**sp, "machine": sp.get("machine") or default}
            for arch, sp in (report.get("speeds") or {}).items() if isinstance(sp, dict)}


def differing(report: dict, settings: dict, defaults: dict | None = None) -> list[str]:
    """The settings (other than :data:`IGNORED`) whose value differs between the report and this run. A setting
    the report does not record (a flag added since) counts as its default there (``defaults``)."""
    theirs = {k: v for k, v in report.get("settings", {}).items() if k not in IGNORED}
    ours = json.loads(json.dumps({k: v for k, v in settings.items() if k not in IGNORED}, default=str))
    known = json.loads(json.dumps(defaults or {}, default=str))
    return sorted(k for k in set(theirs) | set(ours)
                  if theirs.get(k, known.get(k)) != ours.get(k, known.get(k)))


def load(ns, settings: dict, log, defaults: dict | None = None) -> dict:
    """What the committed report ``ns.out + ".json"`` carries into this run (:data:`EMPTY` when there is none, the
    run is a quick one, ``--no_carry`` is given, or a setting differs: ``log`` says which; ``defaults``: the flags'
    defaults, for settings the report predates)."""
    path = str(ns.out) + ".json"
    if getattr(ns, "no_carry", False) or getattr(ns, "quick", False) or not os.path.isfile(path):
        return dict(EMPTY)
    report = json.load(open(path, encoding="utf-8"))
    if report.get("mode") != "full":
        return dict(EMPTY)
    bad = differing(report, settings, defaults)
    if bad:
        log(f"nothing carried from {os.path.basename(path)}: its settings differ in {', '.join(bad)} "
            f"(ours: {', '.join(f'{k}={settings.get(k)!r}' for k in bad)})")
        return dict(EMPTY)
    cells = _cells_of(report)
    params = report.get("params") or {r["name"]: r["params"] for r in report.get("rows", []) if r.get("params")}
    carried = {"cells": cells, "embed": _embed_of(report), "timings": dict(report.get("timings_s") or {}),
               "params": dict(params), "speeds": _speeds_of(report),
               "machine_of": _machines_of(report, cells), "used": set(),
               "source": os.path.basename(path), "count": sum(len(v) for v in cells.values())}
    if carried["count"]:
        log(f"{carried['count']} finished cells in {carried['source']}: those this work dir lacks are not run again")
    return carried


def merged(results: dict, carried: dict) -> dict:
    """``results`` with the carried cells it lacks (a cell finished here wins); ``carried["used"]`` becomes the
    cells taken from the report."""
    out = {key: dict(scores) for key, scores in carried.get("cells", {}).items()}
    for key, scores in results.items():
        out.setdefault(key, {}).update(scores)
    if "used" in carried:
        carried["used"] = {(name, seed, task) for (name, seed), scores in carried.get("cells", {}).items()
                           for task in scores if task not in results.get((name, seed), {})}
    return out


def into_state(state: dict, carried: dict) -> None:
    """The carried minutes, parameter counts and speeds, where the work dir has none of its own."""
    for field in ("timings", "params", "speeds"):
        for key, value in carried.get(field, {}).items():
            state.setdefault(field, {}).setdefault(key, value)


def whole(name: str, seed: int, tasks, carried: dict) -> bool:
    done = carried.get("cells", {}).get((name, seed), {})
    return all(t.name in done for t in tasks)


def tasks_left(row: dict, seed: int, tasks, rows, carried: dict) -> list:
    """The tasks of (row, seed) to run here: those not carried. The teacher's cells of a seed all run when a row that
    reads its fine-tuned models (task KD, a teacher per task) still has that seed to do."""
    if row["kind"] == "teacher" and any(not whole(r["name"], seed, tasks, carried) for r in rows
                                        if r.get("task_kd") or r.get("teachers")):
        return list(tasks)
    done = carried.get("cells", {}).get((row["name"], seed), {})
    return [t for t in tasks if t.name not in done]


def json_fields(results: dict, ns) -> dict:
    """What a report's JSON holds for a later run to carry: every finished cell (``results``, merged) with the
    machine that made it."""
    return {"cells": report_cells(results, getattr(ns, "carried", EMPTY), machine_here())}


def machine_here() -> str:
    """This machine as a cell names the machine that made it."""
    from distill.common.hardware import machine_description

    return _machine(machine_description())


def _machine(m: dict) -> str:
    return f"{m.get('cpu', '?')} ({', '.join(m.get('cpu_bf16') or []) or 'no native bf16'}, {m.get('usable_cores', '?')} usable cores)"


def note(carried: dict) -> str:
    """The report's line on the cells it took from the committed report ('' when none; :func:`merged` first)."""
    used = carried.get("used") or set()
    if not used:
        return ""
    machines = sorted({carried["machine_of"].get(key, "an earlier machine") for key in used})
    return (f"{len(used)} of the table's cells were carried from the committed {carried['source']}, made with these "
            f"settings on {'; '.join(machines)}; the others were made here (a teacher's cells redone here for the "
            "models a task-KD row reads replace its carried ones). `--no_carry` runs everything here.")
