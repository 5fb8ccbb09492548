"""No function over 80 lines: a function that long does several things, and a reader has to hold them all at once.

Every package is measured and its long functions printed (``pytest -s`` shows them); the packages in ``CHECKED``
must have none. The rest join ``CHECKED`` as they are split.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("distill", "glue_eval", "bench")
CHECKED = ("distill", "glue_eval", "bench")  # every package is held to the limit
LIMIT = 80


def long_functions(folder: Path, limit: int = LIMIT) -> list[tuple[str, int, str, int]]:
    """``(file, line, name, length)`` of every function or method under ``folder`` longer than ``limit`` lines, its
    length counted from the ``def`` line to its last line (decorators left out), as ``ast`` places them."""
    found = []
    for path in sorted(folder.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > limit:
                    found.append((str(path.relative_to(folder.parent)), node.lineno, node.name, length))
    return found


def test_the_measure_counts_a_function_from_its_def_to_its_last_line(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    body = "\n".join(f"    x{i} = {i}" for i in range(79))
    deeper = body.replace("    ", "        ")
    (package / "m.py").write_text(
        f"import functools\n\n\ndef short():\n{body}\n    return 0\n\n\n"  # lines 4-84: def + 79 + return = 81
        f"class C:\n    @functools.cache\n    def method(self):\n{deeper}\n\n\n"  # 89-168: def + 79 = 80, the limit
        # 171-253: def, def, 79, return, return = 83 lines; the inner function 172-252: 81
        f"def nested():\n    def inner():\n{deeper}\n        return 1\n    return inner\n")
    found = long_functions(package)
    assert {file for file, *_ in found} == {"pkg/m.py"}
    assert [(name, line, length) for _, line, name, length in found] == [
        ("short", 4, 81), ("nested", 171, 83), ("inner", 172, 81)]


def test_no_function_over_80_lines_in_the_checked_packages():
    report = {package: long_functions(ROOT / package) for package in PACKAGES}
    for package, found in report.items():
        if found and package not in CHECKED:
            print(f"\n{package}: {len(found)} function(s) over {LIMIT} lines (not checked yet):")
            print("\n".join(f"  {file}:{line} {name} ({length} lines)" for file, line, name, length in found))
    over = [f"{file}:{line} {name} ({length} lines)" for package in CHECKED for file, line, name, length in report[package]]
    assert not over, f"split these into named functions of at most {LIMIT} lines: " + "; ".join(over)
