"""The distilled student as a transformers folder: fp32 weights, tokenizer, card, init record; config last."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path


from distill.common.io import atomic_write_json, atomic_write_text, default_file_mode
from distill.models.loading import family_of, pooler_module
from distill.models.student import INIT_RECORD
from distill.train.logs import LOGS

def save_student(out: Path, student, precision, tokenizer, cfg, layers, objective, stats, steps, env, data_desc,
                 pooler_state=None, machine: str | None = None, sentence=None, size: dict | None = None):
    """save_pretrained (fp32 weights, safetensors), tokenizer, model card; config.json written last.

    ``sentence``: the teacher's sentence-transformers pipeline (``sentence_models``), written beside the weights.
    ``size``: a student of chosen size (``layers`` is then None): its shape and how it was initialised.
    """
    from distill.train.card import training_card

    export = precision.export_model(student)  # O2 trains fp16 weights: export the fp32 masters
    if pooler_state is not None:  # the frozen pooler, exact (it has no fp32 master to export)
        pooler_module(export).load_state_dict(pooler_state)
    tmp = Path(out) / ".student.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    export.config.output_hidden_states = False
    export.config.output_attentions = False
    export.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if sentence is not None:
        sentence.write(tmp)
    (tmp / "README.md").write_text(
        training_card(cfg, layers, objective, stats, steps, env.world, env.device.type, precision.description,
                      type(export).__name__, data_desc, auto_reason=precision.auto_reason, machine=machine,
                      size=size),
        encoding="utf-8")
    atomic_write_json(tmp / INIT_RECORD, {"teacher": cfg.teacher, "student_type": family_of(export).name,
                                          "layers": list(layers) if layers is not None else None, **(size or {}),
                                          "distilled": True})
    names = sorted(p.name for p in tmp.iterdir())
    for name in names:
        if (tmp / name).is_file():
            os.chmod(tmp / name, default_file_mode())
    if sentence is None:  # a sentence pipeline left by an earlier run in this folder is not this student's
        (Path(out) / "modules.json").unlink(missing_ok=True)
    for name in [n for n in names if n != "config.json"] + ["config.json"]:  # config last: a folder with it is whole
        if (tmp / name).is_dir() and (Path(out) / name).is_dir():
            shutil.rmtree(Path(out) / name)  # a module folder (e.g. 1_Pooling) of an earlier run here
        os.replace(tmp / name, Path(out) / name)
    tmp.rmdir()
    atomic_write_text(Path(out) / LOGS / "final_terms.json", json.dumps(stats.last_terms or {}, indent=2) + "\n")

