"""glue-eval stopped by a signal mid-cell: the cell checkpoints, the grid exits 75, and the same command
resumes it to the results an uninterrupted grid gives."""

import json
import os
import signal

import pytest

import glue_eval.trainer as trainer_module
from distill.train.signals import EXIT_STOPPED
from glue_eval.cli import main
from glue_eval.samples import write_glue_sample


def grid_argv(model, root, out):
    data = write_glue_sample(str(root / "glue"), "tsv", tasks=["rte"], sizes=(24, 8, 6))
    spec = {"tasks": ["rte"], "learning_rate": [1e-4, 1e-3], "per_device_train_batch_size": [4], "seed": [7],
            "num_train_epochs": 2}
    (root / "grid.json").write_text(json.dumps(spec))
    return ["--model", model, "--grid", str(root / "grid.json"), "--data_dir", data, "--output_dir", str(out),
            "--use_cpu", "--disable_tqdm", "true", "--logging_steps", "1"]


def results(out) -> list[dict]:
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    return [{k: r[k] for k in ("cell", "dev", "score")} | {"steps": r["train"]["steps"]} for r in rows]


def stopped_lines(argv, capsys) -> list[str]:
    """Run the grid, which must exit 75 and give the signal handlers back; its "stopped by" lines."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as ended:
        main(argv)
    assert ended.value.code == EXIT_STOPPED
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the grid gave the handlers back
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("stopped by")]


@pytest.mark.slow  # three grids of two tiny cells: about 25 s
def test_a_grid_stopped_by_sigterm_mid_cell_resumes_to_the_results_of_an_uninterrupted_grid(bert_mlm_dir, tmp_path,
                                                                                             capsys, monkeypatch):
    whole = tmp_path / "whole"
    assert main(grid_argv(bert_mlm_dir, tmp_path, whole)) == 0
    expected = results(whole)
    assert [r["steps"] for r in expected] == [12, 12]

    real = trainer_module.StopOnSignal.on_step_end
    seen = []

    def signalling(self, args, state, control, **kwargs):
        seen.append((args.output_dir, state.global_step))
        if len(seen) == 12 + 5:  # step 5 of the second cell
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, args, state, control, **kwargs)

    monkeypatch.setattr(trainer_module.StopOnSignal, "on_step_end", signalling)
    out = tmp_path / "stopped"
    argv = grid_argv(bert_mlm_dir, tmp_path, out)
    cell = out / "rte" / "lr0.001_bs4_seed7"
    assert stopped_lines(argv, capsys) == [
        f"stopped by SIGTERM in {cell} after step 5: checkpoint {cell / 'checkpoint-5'}; to resume, run the same "
        f"command (finished cells are skipped, this one goes on from its checkpoint) (exit status {EXIT_STOPPED})"]
    assert (cell / "checkpoint-5" / "trainer_state.json").is_file() and not (cell / "result.json").exists()
    assert (out / "rte" / "lr0.0001_bs4_seed7" / "result.json").exists()  # the first cell had finished

    seen.clear()
    monkeypatch.setattr(trainer_module.StopOnSignal, "on_step_end", real)
    assert main(argv) == 0
    assert results(out) == expected  # the resumed cell trained steps 6..12 only and ended where the whole run did
    assert not list(cell.glob("checkpoint-*"))  # a finished cell keeps no checkpoint (save_strategy "no")


@pytest.mark.slow  # one grid of two tiny cells, and its second half: about 15 s
def test_a_signal_during_a_cells_evaluation_keeps_the_cell_and_stops_the_grid_after_recording_it(
        bert_mlm_dir, tmp_path, capsys, monkeypatch):
    """Training done, the signal comes while the first cell is scored: the cell is recorded (not trained again
    on the rerun), the grid exits 75 before the second cell, and the same command runs only the second."""
    import glue_eval.finetune as finetune_module

    real = finetune_module.evaluate
    calls = []

    def signalled(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # recorded: the handler does not end the process mid-evaluation
        return real(*args, **kwargs)

    monkeypatch.setattr(finetune_module, "evaluate", signalled)
    out = tmp_path / "out"
    argv = grid_argv(bert_mlm_dir, tmp_path, out)
    first, second = out / "rte" / "lr0.0001_bs4_seed7", out / "rte" / "lr0.001_bs4_seed7"
    assert stopped_lines(argv, capsys) == [f"stopped by SIGTERM after cell {first} was recorded: run the same command "
                                           f"to go on (finished cells are skipped) (exit status {EXIT_STOPPED})"]
    assert json.loads((first / "result.json").read_text())["train"]["steps"] == 12 and not second.exists()
    assert not list(first.glob("checkpoint-*"))
    started = []
    monkeypatch.setattr(finetune_module, "evaluate", lambda *a, **k: started.append(1) or real(*a, **k))
    assert main(argv) == 0
    assert len(started) == 1 and [r["cell"] for r in results(out)] == ["lr0.0001_bs4_seed7", "lr0.001_bs4_seed7"]
