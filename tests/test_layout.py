"""The shape of the house: the package's import graph has no circle, the autograd Functions are
its bottom, the registry knows no model, and no function or class outgrows a reading."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import bioexp

PACKAGE = Path(bioexp.__file__).parent
MAX_FUNCTION_LINES, MAX_CLASS_LINES = 60, 120


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def sources() -> dict[str, ast.Module]:
    return {module_name(p): ast.parse(p.read_text()) for p in sorted(PACKAGE.rglob("*.py"))}


def imports(module: str, tree: ast.Module, known: set[str]) -> set[str]:
    """The bioexp modules `module` imports anywhere in its code (inside functions too)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
        else:
            continue
        found |= {name for name in names if name in known and name != module}
    return found


def graph() -> dict[str, set[str]]:
    trees = sources()
    return {name: imports(name, tree, set(trees)) for name, tree in trees.items()}


def test_no_import_circles() -> None:
    edges = graph()
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for dep in sorted(edges[node]):
            if state.get(dep) == 1:
                pytest.fail("import circle: " + " -> ".join(path[path.index(dep):] + [dep]))
            if dep not in state:
                visit(dep)
        path.pop()
        state[node] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module)


def test_the_autograd_functions_and_the_registry_stand_alone() -> None:
    edges = graph()
    for module in (m for m in edges if m.startswith("bioexp.feedback")):
        outside = {d for d in edges[module] if not d.startswith("bioexp.feedback")}
        assert not outside, f"{module} imports {outside}"
    assert not {d for d in edges["bioexp.registry"] if d.startswith("bioexp.models")}


def docstring_lines(node: ast.AST) -> int:
    """How many lines of `node` are docstrings (its own and those of what it defines)."""
    count = 0
    for inner in ast.walk(node):
        body = getattr(inner, "body", None)
        if (isinstance(inner, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and body
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            count += body[0].end_lineno - body[0].lineno + 1
    return count


def test_no_function_or_class_outgrows_a_reading() -> None:
    """Code, not documentation, is what must stay short: docstrings do not count."""
    too_long = []
    for name, tree in sources().items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                lines = node.end_lineno - node.lineno + 1 - docstring_lines(node)
                limit = MAX_CLASS_LINES if isinstance(node, ast.ClassDef) else MAX_FUNCTION_LINES
                if lines > limit:
                    too_long.append(f"{name}.{node.name}: {lines} lines (at most {limit})")
    assert not too_long, too_long


def depends_on(module: str, edges: dict[str, set[str]]) -> set[str]:
    """Every bioexp module `module` imports, directly or through others."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        for dep in edges[todo.pop()] - seen:
            seen.add(dep)
            todo.append(dep)
    return seen


def test_the_library_needs_neither_the_command_line_nor_hydras_private_modules() -> None:
    """Hydra's `_internal` modules change without notice between releases; the Python API and
    the library under it stand without the `bioexp` command."""
    private = [name for name, tree in sources().items() for node in ast.walk(tree)
               if isinstance(node, (ast.Import, ast.ImportFrom))
               and any("hydra._internal" in (n or "") for n in
                       [getattr(node, "module", None), *(a.name for a in node.names)])]
    assert not private, f"modules importing hydra._internal: {private}"
    edges = graph()
    assert "bioexp.cli" not in depends_on("bioexp.api", edges)
    assert {m for m, deps in edges.items() if "bioexp.cli" in deps} <= {"bioexp.__main__"}
