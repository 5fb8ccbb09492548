"""bench.carry: what a study's committed report carries into a run on another machine (the end-to-end case is in
tests/test_study_multitask.py)."""

import json
from types import SimpleNamespace

from tests import tiny

carry = tiny.bench_module("carry")
TASKS = [SimpleNamespace(name="a"), SimpleNamespace(name="b")]


def write(tmp_path, report: dict) -> SimpleNamespace:
    (tmp_path / "r.json").write_text(json.dumps(report))
    return SimpleNamespace(out=str(tmp_path / "r"), quick=False)


def test_a_report_without_a_cell_list_gives_its_rows_whole_seeds_in_order(tmp_path):
    rows = [{"name": "t", "seeds": [1, 3], "scores": {"a": [80.0, 90.0], "b": [50.0, 70.0]}, "embed": {"average": 0.5}},
            {"name": "s", "seeds": [], "scores": {"a": [], "b": []}, "embed": None}]
    ns = write(tmp_path, {"mode": "full", "settings": {"lr": 1}, "rows": rows, "timings_s": {"finetune t seed 1": 3.0},
                          "machine": {"cpu": "X"}})
    got = carry.load(ns, {"lr": 1, "out": "elsewhere", "seeds": "1,2"}, print)
    assert got["cells"] == {("t", 1): {"a": 0.8, "b": 0.5}, ("t", 3): {"a": 0.9, "b": 0.7}}
    assert got["embed"] == {"t": {"scores": None, "averages": {"average": 0.5}}} and got["count"] == 4
    assert set(got["machine_of"].values()) == {"X (no native bf16, ? usable cores)"}  # the report's own machine
    state = {"timings": {"finetune t seed 1": 9.0}}
    carry.into_state(state, got)
    assert state["timings"] == {"finetune t seed 1": 9.0}  # the work dir's own figure wins


def test_speeds_are_carried_with_their_machine_and_a_speed_measured_here_wins(tmp_path):
    speeds = {"4x768": {"batch32": {"speedup_median": 3.1}, "machine": "A", "threads": 2},
              "6x384": {"batch32": {"speedup_median": 2.0}, "machine": "A", "threads": 2}}
    ns = write(tmp_path, {"mode": "full", "settings": {}, "cells": [], "speeds": speeds})
    got = carry.load(ns, {}, print)
    state = {"speeds": {"6x384": {"batch32": {"speedup_median": 2.2}, "machine": "B", "threads": 1}}}
    carry.into_state(state, got)
    assert state["speeds"] == {"4x768": speeds["4x768"], "6x384": {"batch32": {"speedup_median": 2.2},
                                                                   "machine": "B", "threads": 1}}
    mpnet = tiny.bench_module("study_mpnet")
    assert mpnet.speed_source(state["speeds"]).startswith(" Measured on more than one machine (A, 2 torch threads; "
                                                          "B, 1 torch thread)")
    assert mpnet.speed_source({"4x768": speeds["4x768"]}) == " Measured on A, 2 torch threads."
    assert mpnet.speed_source({}) == ""
    # a speed measured before speeds named their machine: the report's own
    ns = write(tmp_path, {"mode": "full", "settings": {}, "cells": [], "machine": {"cpu": "X"},
                          "speeds": {"4x768": {"batch32": {"speedup_median": 3.1}, "threads": 2}}})
    assert carry.load(ns, {}, print)["speeds"]["4x768"]["machine"] == "X (no native bf16, ? usable cores)"


def test_the_cell_list_round_trips_and_a_differing_setting_carries_nothing(tmp_path):
    results = {("t", 1): {"a": 0.25, "b": 0.5}, ("s", 2): {"a": 1 / 3}}
    ns = write(tmp_path, {"mode": "full", "settings": {"lr": 1, "path": "CACHE/x"},
                          "cells": carry.report_cells(results, here="M")})
    assert carry.load(ns, {"lr": 1, "path": "CACHE/x"}, print)["cells"] == results
    said = []
    assert carry.load(ns, {"lr": 2, "path": "CACHE/x"}, said.append)["count"] == 0
    assert "differ in lr" in said[0] and "lr=2" in said[0]
    assert carry.load(ns, {"lr": 1}, said.append)["count"] == 0 and "differ in path" in said[1]
    for off in (SimpleNamespace(out=ns.out, quick=True), SimpleNamespace(out=ns.out, quick=False, no_carry=True)):
        assert carry.load(off, {"lr": 1, "path": "CACHE/x"}, print)["count"] == 0


def test_a_cell_finished_here_wins_over_a_carried_one_and_only_the_others_count_as_carried():
    carried = {"cells": {("t", 1): {"a": 0.1, "b": 0.2}, ("u", 2): {"a": 0.5}}, "used": set(), "source": "r.json",
               "machine_of": {("t", 1, "a"): "M1", ("t", 1, "b"): "M1", ("u", 2, "a"): "M2"}}
    assert carry.merged({("t", 1): {"a": 0.9}, ("s", 1): {"a": 0.3}}, carried) == {
        ("t", 1): {"a": 0.9, "b": 0.2}, ("s", 1): {"a": 0.3}, ("u", 2): {"a": 0.5}}
    assert carried["used"] == {("t", 1, "b"), ("u", 2, "a")}
    assert carry.note(carried).startswith("2 of the table's cells were carried from the committed r.json, made with "
                                          "these settings on M1; M2;")
    cells = carry.report_cells({("t", 1): {"a": 0.9, "b": 0.2}}, carried, here="H")
    assert [(c["task"], c["machine"]) for c in cells] == [("a", "H"), ("b", "M1")]  # each cell names its maker


def test_the_teacher_runs_again_while_a_row_that_reads_its_models_has_the_seed_to_do():
    rows = [{"name": "teacher", "kind": "teacher"}, {"name": "s", "kind": "single"},
            {"name": "kd", "kind": "single", "task_kd": ["kl"]}, {"name": "mt", "kind": "multitask", "teachers": True}]
    whole = {"a": 0.5, "b": 0.5}
    carried = {"cells": {("teacher", 1): whole, ("s", 1): {"a": 0.5}, ("kd", 1): whole, ("mt", 1): whole,
                         ("teacher", 2): whole, ("kd", 2): whole}}
    names = lambda row, seed: [t.name for t in carry.tasks_left(row, seed, TASKS, rows, carried)]  # noqa: E731
    assert names(rows[0], 1) == [] and names(rows[1], 1) == ["b"] and names(rows[2], 1) == []
    assert names(rows[0], 2) == ["a", "b"]  # mt has seed 2 to do: it needs the teacher's seed-2 models
    assert names(rows[3], 2) == ["a", "b"] and names(rows[2], 2) == []


def test_a_setting_the_report_predates_counts_as_its_default(tmp_path):
    ns = write(tmp_path, {"mode": "full", "settings": {"lr": 1}, "cells": carry.report_cells({("t", 1): {"a": 0.5}})})
    defaults = {"lr": None, "new_flag": False}
    assert carry.load(ns, {"lr": 1, "new_flag": False}, print, defaults)["count"] == 1
    said = []
    assert carry.load(ns, {"lr": 1, "new_flag": True}, said.append, defaults)["count"] == 0
    assert "differ in new_flag" in said[0]
