"""The layering rule, read from the source (ast, nothing imported): scripts -> distill -> cache/students ->
teachers. ``cache`` never imports ``students``/``distill``; ``students`` never imports ``distill``/``cache``;
``teachers`` imports none of the three; no package is imported by one below it; no import cycle among
the modules (function-local imports included)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("scripts", "distill", "cache", "students", "teachers")
# what each package may import (besides itself)
ALLOWED = {
    "scripts": {"distill", "cache", "students", "teachers"},
    "distill": {"cache", "students", "teachers"},
    "cache": {"teachers"},
    "students": {"teachers"},
    "teachers": set(),
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            out[module_name(path)] = path
    return out


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules ``name`` imports (absolute and relative, anywhere in the file)."""
    is_pkg = path.name == "__init__.py"
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base[: len(base) - node.level + 1]
                mod = ".".join(anchor + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [mod] + [f"{mod}.{alias.name}" for alias in node.names]
        for target in targets:
            # the project is imported as tipsdistill.<folder>...; the layering speaks of the folders
            target = target.removeprefix("tipsdistill.")
            # the longest project module that the target names (a package, or a module in it)
            parts = target.split(".")
            for n in range(len(parts), 0, -1):
                cand = ".".join(parts[:n])
                if cand in known:
                    if cand != name:
                        found.add(cand)
                    break
    return found


def graph() -> dict[str, set[str]]:
    mods = all_modules()
    known = set(mods)
    return {name: imports_of(name, path, known) for name, path in mods.items()}


def test_the_walk_sees_the_project() -> None:
    g = graph()
    assert {
        "distill.task",
        "cache.reader",
        "students.vit",
        "teachers.base",
        "scripts.train",
    } <= set(g)
    assert "distill.data" in g["distill.task"] and "cache" in g["distill.task"]
    assert "teachers.base" in g["cache.extract"]  # an absolute import
    assert "teachers.vit" in g["teachers.embedded"]  # a relative one


def test_imports_run_one_way() -> None:
    bad = []
    for name, deps in graph().items():
        pkg = name.split(".")[0]
        for dep in deps:
            other = dep.split(".")[0]
            if other != pkg and other not in ALLOWED[pkg]:
                bad.append(f"{name} imports {dep}")
    assert not bad, (
        "imports against the layering (scripts -> distill -> cache/students -> teachers):\n"
        + "\n".join(sorted(bad))
    )


def _find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(g.get(node, ())):
            # a package's __init__ importing its own submodules is how packages are built, not a cycle
            if node == dep.rsplit(".", 1)[0] and "." in dep:
                continue
            if state.get(dep) == 1:
                return stack[stack.index(dep) :] + [dep]
            if dep not in state:
                found = visit(dep)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(g):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_no_import_cycle() -> None:
    cycle = _find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_cycle_finder_finds_one() -> None:
    assert _find_cycle({"a.x": {"a.y"}, "a.y": {"a.z"}, "a.z": {"a.x"}}) == ["a.x", "a.y", "a.z", "a.x"]
    assert _find_cycle({"a.x": {"a.y"}, "a.y": set()}) is None


@pytest.mark.parametrize("pkg", ["teachers", "students", "cache"])
def test_lower_packages_do_not_reach_up(pkg: str) -> None:
    above = {
        "teachers": {"students", "distill", "cache", "scripts"},
        "students": {"distill", "cache", "scripts"},
    }
    above["cache"] = {"students", "distill", "scripts"}
    g = graph()
    reach = sorted(
        f"{m} -> {d}"
        for m, deps in g.items()
        if m.split(".")[0] == pkg
        for d in deps
        if d.split(".")[0] in above[pkg]
    )
    assert not reach, reach


def test_every_project_import_goes_through_the_namespace() -> None:
    """``import cache`` would work in a source tree and fail from the wheel (the folders are installed as
    ``tipsdistill.<folder>``, setup.cfg ``package_dir``), and any ``cache/`` folder in the working directory
    would shadow it: the project is always imported as ``tipsdistill.<folder>`` or relatively."""
    bad = []
    roots = [*PACKAGES, "tests"]
    for pkg in roots:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and not node.level:
                    names = [node.module or ""]
                else:
                    continue
                bad += [
                    f"{path.relative_to(ROOT)}:{node.lineno}: {n}"
                    for n in names
                    if n.split(".")[0] in PACKAGES
                ]
    assert not bad, "imports outside the tipsdistill namespace:\n" + "\n".join(bad)
