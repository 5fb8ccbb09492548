"""Generated reference pages match the code they are generated from."""

import dataclasses

from distill.settings import reference
from distill.settings.config import DistillConfig


def test_committed_reference_pages_are_current(tmp_path):
    # a stale page is reported, then regenerated pages pass the check
    (tmp_path / "configuration.md").write_text("old\n")
    assert reference.main(["--check", "--docs", str(tmp_path)]) == 1
    assert reference.main(["--docs", str(tmp_path)]) == 0
    assert reference.main(["--check", "--docs", str(tmp_path)]) == 0
    # and the committed docs folder is current
    assert reference.main(["--check"]) == 0, "run: python -m distill.settings.reference"


def test_configuration_page_has_one_row_per_field_under_its_source_section():
    page = reference.configuration_markdown()
    rows = [line for line in page.splitlines() if line.startswith("| `")]
    assert [r.split("`")[1] for r in rows] == [f.name for f in dataclasses.fields(DistillConfig)]
    # the section heading above `precision` is the one written above it in config.py
    before = page[: page.index("| `precision` |")]
    assert before.rindex("## ") == before.rindex("## Precision")
