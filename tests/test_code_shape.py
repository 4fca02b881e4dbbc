"""The method's two long-lived drivers stay readable: no function in ``distill/train.py`` or
``cache/extract.py`` is longer than 80 lines (issue 28). Read with ast from the source, nothing imported."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MAX_LINES = 80


def long_functions(path: Path, limit: int = MAX_LINES) -> list[str]:
    """``name (N lines, from line L)`` of every function (methods and nested ones too) of ``path``
    longer than ``limit`` lines, decorators and docstring included."""
    tree = ast.parse(path.read_text(), str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            n = node.end_lineno - first + 1
            if n > limit:
                out.append(f"{node.name} ({n} lines, from line {first})")
    return out


def test_the_measure_sees_a_long_function(tmp_path: Path) -> None:
    body = "\n".join(f"        x{i} = {i}" for i in range(MAX_LINES))
    (tmp_path / "m.py").write_text(
        f"def short():\n    return 1\n\n\nclass C:\n    @staticmethod\n    def long():\n{body}\n"
    )
    assert long_functions(tmp_path / "m.py") == [f"long ({MAX_LINES + 2} lines, from line 6)"]


@pytest.mark.parametrize(
    "rel",
    ["distill/train.py", "cache/extract.py"],
)
def test_no_function_longer_than_80_lines(rel: str) -> None:
    found = long_functions(ROOT / rel)
    assert not found, f"{rel}: functions longer than {MAX_LINES} lines: {', '.join(found)}"
