"""The package layout holds: dependencies point one way, no cycles, no private imports.

Read with ``ast`` from the source files, imports inside functions included.
"""
from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "soundlake"
# Lower layers never import higher ones; a layer may import its own (without cycles).
LAYERS = {
    "core": 0,
    "catalog": 1,
    "sources": 2, "stages": 2, "models": 2,
    "dedup": 2,   # imports soundlake.core only
    "pipelines": 3, "export": 3, "generation": 3,
    "cli": 4, "testing": 4, "serve": 4,
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def layer(module: str) -> int:
    top = module.split(".")[1] if module.count(".") else ""
    return LAYERS.get(top, 0)   # soundlake/__init__.py sits below everything


def imports(module: str) -> list[tuple[str, list[str], int]]:
    """(imported soundlake module, names taken from it, line) for every import statement."""
    tree = ast.parse(MODULES[module].read_text())
    package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names if a.name.startswith("soundlake")]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            if not base.startswith("soundlake"):
                continue
            names = [a.name for a in node.names]
            submodules = [n for n in names if f"{base}.{n}" in MODULES]
            out += [(f"{base}.{n}", [], node.lineno) for n in submodules]
            rest = [n for n in names if n not in submodules]
            if rest or not submodules:
                out.append((base, rest, node.lineno))
    return out


def private_attribute_uses(module: str) -> list[str]:
    """``alias._name`` where ``alias`` is an imported soundlake module."""
    tree = ast.parse(MODULES[module].read_text())
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("soundlake"):
            for a in node.names:
                if f"{node.module}.{a.name}" in MODULES:
                    aliases[a.asname or a.name] = f"{node.module}.{a.name}"
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("soundlake") and a.asname:
                    aliases[a.asname] = a.name
    return [f"{aliases[n.value.id]}.{n.attr} (line {n.lineno})" for n in ast.walk(tree)
            if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id in aliases
            and n.attr.startswith("_") and not n.attr.startswith("__")]


GRAPH = {m: sorted({target for target, _, _ in imports(m) if target in MODULES and target != m}) for m in MODULES}


def test_every_import_resolves_to_a_module():
    missing = [f"{m}: {t} (line {line})" for m in MODULES for t, _, line in imports(m) if t not in MODULES]
    assert not missing, missing


def test_every_imported_name_exists():
    """Imports inside functions run only when called: check each name against its module."""
    missing = []
    for m in MODULES:
        for t, names, line in imports(m):
            module = importlib.import_module(t)
            missing += [f"{m}: from {t} import {n} (line {line})" for n in names
                        if n != "*" and not hasattr(module, n) and f"{t}.{n}" not in MODULES]
    assert not missing, "\n".join(missing)


def test_no_private_names_from_other_modules():
    bad = [f"{m}: from {t} import {n} (line {line})" for m in MODULES for t, names, line in imports(m)
           for n in names if n.startswith("_") and t != m]
    bad += [f"{m}: {use}" for m in MODULES for use in private_attribute_uses(m)]
    assert not bad, "\n".join(bad)


def test_dependencies_point_one_way():
    upward = [f"{m} (layer {layer(m)}) imports {t} (layer {layer(t)})"
              for m, targets in GRAPH.items() for t in targets if layer(t) > layer(m)]
    assert not upward, "\n".join(upward)


def test_no_import_cycles():
    state: dict[str, int] = {}   # 1: on the current path, 2: done
    cycles: list[list[str]] = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in GRAPH[m]:
            if state.get(t) == 1:
                cycles.append(path[path.index(t):] + [t])
            elif t not in state:
                visit(t, path + [t])
        state[m] = 2

    for m in MODULES:
        if m not in state:
            visit(m, [m])
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("top", sorted(LAYERS))
def test_every_layer_exists(top):
    assert any(m.split(".")[1:2] == [top] for m in MODULES), top
