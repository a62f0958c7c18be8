"""The package's layers are one-way, read from the source: every textdiff import goes down the floors of
docs/architecture.md (or stays in its own package), no module imports itself through a cycle, and an import
inside a function only defers a heavy or optional dependency, saying so in a comment."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "textdiff"

# bottom to top; a module may import from lower floors and from its own package (docs/architecture.md)
FLOORS = (
    ("files", "malloc", "config"),
    ("ocr",),
    ("data", "models", "diffusion"),
    ("formats",),
    ("train",),
    ("sampling",),
    ("eval",),
    ("experiments", "bench", "launch"),
)
FLOOR = {part: i for i, parts in enumerate(FLOORS) for part in parts}
# what an import inside a function may defer: dependencies that take seconds to import or are optional
DEFERRABLE = ("deepspeed", "open_clip", "diffusers", "webdataset", "torch.utils.tensorboard", "resource",
              "rapidocr_onnxruntime", "onnxruntime", "s3fs", "gcsfs", "textdiff.models.caption", "textdiff.ocr.ppocr")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def part_of(module: str) -> str:
    """The floor-holding part of a textdiff module: its subpackage, or the top-level module itself."""
    return module.split(".")[1] if module.count(".") else module


def imports(path: Path) -> list[tuple[str, int, bool, str]]:
    """(imported module, line, inside a function, its source with the line above its group of imports) of
    ``path``."""
    source = path.read_text(encoding="utf-8")
    lines = source.splitlines()
    tree = ast.parse(source)
    inner = {id(sub) for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
             for sub in ast.walk(node) if isinstance(sub, (ast.Import, ast.ImportFrom))}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
            if node.module == "textdiff":  # from textdiff import files
                names = [f"textdiff.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        first = node.lineno - 1  # a comment may stand above a group of imports, or on the import itself
        while first > 0 and lines[first - 1].strip().startswith(("import ", "from ")):
            first -= 1
        context = lines[max(0, first - 1):node.end_lineno]
        found += [(name, node.lineno, id(node) in inner, "\n".join(context)) for name in names]
    return found


def against_the_floors(module: str, path: Path) -> list[str]:
    """The textdiff imports of ``module`` (at ``path``) that go sideways or up the floors."""
    mine = part_of(module)
    return [f"line {line}: {name}" for name, line, _, _ in imports(path)
            if name.startswith("textdiff.") and part_of(name) != mine and FLOOR[part_of(name)] >= FLOOR.get(mine, 99)]


def unexplained_deferred(path: Path) -> list[str]:
    """Imports inside functions of ``path`` that defer no heavy dependency, or carry no comment saying so."""
    return [f"line {line}: {name}" for name, line, inner, context in imports(path)
            if inner and (not name.startswith(DEFERRABLE) or "#" not in context)]


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def test_every_part_of_the_package_has_a_floor():
    assert sorted({part_of(m) for m in MODULES if m != "textdiff"} - set(FLOOR)) == []


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_go_down_the_floors(module):
    assert against_the_floors(module, MODULES[module]) == [], f"{module} imports sideways or upwards"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_an_import_inside_a_function_defers_a_heavy_dependency_and_says_so(module):
    assert unexplained_deferred(MODULES[module]) == []


def test_no_import_cycle_between_modules():
    graph = {m: {n for n, *_ in imports(p) if n in MODULES and n != m} for m, p in MODULES.items()}
    # a package's __init__ re-exporting its modules is not a cycle of the story
    for m in graph:
        graph[m] = {n for n in graph[m] if not m.startswith(n + ".")}
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(m: str, trail: list[str]) -> bool:
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycle.extend(trail[trail.index(n):] + [m, n] if n in trail else [m, n])
                return True
            if state.get(n) is None and visit(n, trail + [m]):
                return True
        state[m] = 2
        return False

    for m in sorted(graph):
        if state.get(m) is None and visit(m, []):
            break
    assert cycle == []


def test_the_checker_sees_an_upward_import_and_an_unexplained_deferred_one(tmp_path):
    """The rules above can fail: a data module importing train, a function importing DeepSpeed with no
    comment, and one importing a light module with one, are all reported; a commented DeepSpeed one is not."""
    bad = tmp_path / "bad.py"
    bad.write_text("from textdiff.train.engine import device\n\n\ndef f():\n    import deepspeed\n    import json  # x\n"
                   "    # deferred: seconds to import\n    import deepspeed.comm\n")
    assert against_the_floors("textdiff.data.bad", bad) == ["line 1: textdiff.train.engine"]
    assert against_the_floors("textdiff.train.bad", bad) == []  # its own package
    assert unexplained_deferred(bad) == ["line 5: deepspeed", "line 6: json"]
