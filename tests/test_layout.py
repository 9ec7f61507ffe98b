"""The package's shape, as the README's Architecture section draws it: modules small enough to read
in one sitting, or saying why not."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src" / "alpaca_forge"
MOST_LINES = 450

pytestmark = pytest.mark.unit


def test_no_module_over_450_lines_unless_its_docstring_says_why():
    long = []
    for path in sorted(SRC.rglob("*.py")):
        text = path.read_text()
        lines = text.count("\n")
        doc = ast.get_docstring(ast.parse(text)) or ""
        if lines > MOST_LINES and "one concern" not in doc:
            long.append(f"{path.relative_to(SRC)}: {lines} lines")
    assert not long, (
        f"over {MOST_LINES} lines, with no word in the docstring on why it is one concern: {long}; "
        "split it by concern, or say in its docstring why it is one"
    )
