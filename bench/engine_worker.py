"""One distillation engine in a process of its own, stepped on command: the other end of :mod:`bench.levers`.

Started by ``bench.levers.EngineWorker`` from the root of the tree whose engine it times (the current checkout,
or an older commit's files from ``git archive``), as
``python -c "import runpy; runpy.run_path(THIS_FILE, run_name='__main__')" BATCH_FILE THREADS OVERRIDES_JSON``,
so ``import distill`` finds that tree's package. It builds the run the way ``distill-train`` does
(``distill.train.setup.build_run`` and ``optimisation`` over the demo recipe with ``OVERRIDES_JSON`` on top), so
whatever that engine's setup decides (teacher preparation, compile) is what is timed; the batch comes from the
parent (``torch.save``), so both engines see the same tokens. Written against the engine's API as of issue 24
(``build_run``, ``optimisation``, ``Precision.autocast/backward/step``, ``Objective.extract_kwargs``).

Protocol, one JSON line each way: after set-up and one untimed step it prints ``{"ready": ...}``; then each
``step`` (forward, loss, backward, optimiser step) or ``teacher`` (the teacher's forward alone, as the step
runs it) line is answered by ``{"wall": s, "cpu": s, "loss": x}``; ``quit`` ends it. Everything else the
engine prints goes to stderr.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time


def build(overrides: dict, work: str):
    """(cfg, run, optimisation) of the demo recipe with ``overrides``, output and caches under ``work``."""
    from distill.settings.config import DEMO_RECIPE, make_config
    from distill.train.distributed import setup_distributed
    from distill.train.setup import build_run, optimisation

    values = {**DEMO_RECIPE, "output_dir": os.path.join(work, "out"), "progress": False, "max_steps": 1000,
              **overrides}
    cfg = make_config(values)
    env = setup_distributed(cfg.device)
    run = build_run(cfg, env)
    return cfg, run, optimisation(cfg, run, env)


def commands(cfg, run, opt, batch):
    """The timed actions: ``step`` and ``teacher``, each returning the loss (or 0.0)."""
    import torch

    from distill.models.loading import extract

    def step():
        with run.precision.autocast():
            loss, _ = opt.model(batch)
        run.precision.backward(loss)
        run.precision.step(opt.optimizer, cfg.max_grad_norm)
        return float(loss.detach())

    def teacher():
        kwargs = run.objective.extract_kwargs(batch, "teacher")
        with run.precision.autocast(), torch.no_grad():
            extract(run.teacher, batch["input_ids"], batch["attention_mask"], **kwargs)
        return 0.0

    return {"step": step, "teacher": teacher}


def main() -> int:
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # whatever the engine prints goes to stderr; stdout carries the protocol alone
    batch_file, threads, overrides = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
    import torch

    import distill

    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory(prefix="bench-engine-") as work:
        cfg, run, opt = build(overrides, work)
        batch = {k: v.to(run.student.device) for k, v in torch.load(batch_file).items()}
        actions = commands(cfg, run, opt, batch)
        t0 = time.perf_counter()
        first_loss = actions["step"]()  # the first step (same weights, same batch in every engine); compiles
        first = time.perf_counter() - t0
        protocol.write(json.dumps({"ready": True, "distill": os.path.dirname(distill.__file__),
                                   "precision": run.precision.mode, "threads": torch.get_num_threads(),
                                   "first_step_s": first, "first_loss": first_loss}) + "\n")
        for line in sys.stdin:
            name = line.strip()
            if name == "quit":
                break
            t0, c0 = time.perf_counter(), time.process_time()
            loss = actions[name]()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            protocol.write(json.dumps({"wall": time.perf_counter() - t0, "cpu": time.process_time() - c0,
                                       "loss": loss}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
