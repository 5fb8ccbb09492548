"""Each setting is declared once (distill.common.declare.setting): everything else is read from that field.

The proof adds a field in one place, a subclass of the real recipe with one new declaration, and finds it
in every derived place: the command line, the range check and its message, the resume list, the run record,
glue-eval's task-stage arguments and the configuration reference page.
"""

from __future__ import annotations

import dataclasses
import json

import pytest

from distill.common.declare import (
    UNIT,
    check_ranges,
    resume_fields,
    setting,
    task_fields,
)
from distill.common.errors import UsageError
from distill.objective.settings import (
    ObjectiveSettings,
    task_settings_class,
)
from distill.settings import config, reference
from glue_eval.arguments import GlueArguments


@dataclasses.dataclass
class WithKnob(config.DistillConfig):
    knob: float = setting(0.25, "a new objective knob", range=UNIT, task=True, task_default=0.5)
    chatter: int = setting(3, "a new logging setting", resume=False)


def test_a_new_field_appears_in_every_derived_place():
    # the command line, with its declared range in the help
    parser = config.build_parser(WithKnob)
    ns = parser.parse_args(["--knob", "0.75", "--chatter", "9"])
    assert (ns.knob, ns.chatter) == (0.75, 9)
    assert "allowed: [0, 1]" in next(a.help for a in parser._actions if a.dest == "knob")
    # the range check, one message
    with pytest.raises(UsageError, match=r"^knob=1.5 is out of range: it must be a finite number in \[0, 1\]$"):
        check_ranges(WithKnob(knob=1.5))
    # the resume list: kept unless declared otherwise
    assert "knob" in resume_fields(WithKnob) and "chatter" not in resume_fields(WithKnob)
    # the run record: distill_config.json is cfg.to_dict(), the declared fields with their values
    assert json.loads(json.dumps(WithKnob(knob=0.75).to_dict()))["knob"] == 0.75
    # glue-eval's task stage: the same name and range, its own default
    task = {f.name: f for f in task_fields(WithKnob)}
    assert "knob" in task and "chatter" not in task
    glue_side = task_settings_class(WithKnob)()
    assert glue_side.knob == 0.5
    # the reference page: a row with its default, range, resume and glue-eval columns
    row = next(line for line in reference.configuration_markdown(WithKnob).splitlines() if line.startswith("| `knob`"))
    assert row.split(" | ")[1:] == ["`0.25`", "a new objective knob; allowed: [0, 1]", "yes", "`--knob` (default `0.5`) |"]


def test_the_real_declarations_drive_resume_and_glue_eval():
    fields = {f.name: f for f in dataclasses.fields(config.DistillConfig)}
    # every field that decides what a step computes is kept on resume; the ones that fell behind are in
    assert {"logit_chunk_rows", "amp_backend", "force_o3"} <= set(config.RESUME_FIELDS)
    assert config.RESUME_FIELDS == tuple(n for n, f in fields.items() if f.metadata["resume"])
    assert not {"output_dir", "logging_steps", "save_steps", "device", "threads"} & set(config.RESUME_FIELDS)
    # glue-eval's arguments inherit every shared setting of the whole recipe, with their declared task defaults
    shared = {f.name: f for f in task_fields(config.DistillConfig)}
    assert set(shared) == {f.name for f in task_fields(ObjectiveSettings)} == {"temperature", "layer_map"}
    glue_fields = {f.name: f for f in dataclasses.fields(GlueArguments)}
    assert all(glue_fields[name].metadata["range"] == f.metadata["range"] for name, f in shared.items())
    args = GlueArguments()
    for name, f in shared.items():
        assert getattr(args, name) == f.metadata["task_default"]
    assert args.temperature == 1.0 and config.DistillConfig().temperature == 2.0  # the two stages' defaults


def test_the_temperature_has_one_bound_and_one_message_everywhere(tmp_path):
    import torch

    from distill.objective.losses import (
        TEMPERATURE,
        check_temperature,
        soft_cross_entropy,
    )

    expected = r"temperature=0(\.0)? is out of range: it must be a finite number in \(0, 100\]"
    assert str(TEMPERATURE) == "(0, 100]"
    with pytest.raises(UsageError, match=expected):
        check_temperature(0)
    with pytest.raises(UsageError, match=expected):
        soft_cross_entropy(torch.zeros(2, 3), torch.zeros(2, 3), 0)
    with pytest.raises(UsageError, match=expected):
        config.make_config({"temperature": 0})
    with pytest.raises(UsageError, match=expected):
        check_ranges(GlueArguments(temperature=0))
    assert check_temperature(100) == 100.0
