"""The README's two set-up commands are the ones CI runs."""

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).parent.parent


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"^```[^\n]*\n(.*?)^```", text, flags=re.S | re.M)
    return [line for line in block.group(1).splitlines()]


def test_ci_runs_the_readme_commands():
    printed = subprocess.run(["bash", str(ROOT / ".ci" / "run"), "--print"], capture_output=True, text=True, check=True)
    assert printed.stdout.splitlines() == readme_commands()


def test_install_pins_the_cpu_torch_before_the_project_and_test_runs_pytest():
    install, test = readme_commands()
    assert install.index("torch==2.13.0") < install.index("-e")
    assert "apex" not in install
    assert "pytest" in test
