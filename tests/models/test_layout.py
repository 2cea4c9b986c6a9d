"""The layout keeps to its architecture: no import circle between the project's modules, every family in
models/families/ and registered, nothing but families there, and no model math reached from deployments/."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from models import families

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("models", "serve_app", "deployments", "autoscaling")


def project_modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules `name` imports anywhere in its source (function-level imports too: a deferred import
    is still a dependency). Importing a submodule is not counted as importing its package."""
    base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = ".".join(base[:len(base) - node.level + 1] + ([node.module] if node.module else [])) \
                if node.level else node.module
            subs = [f"{module}.{a.name}" for a in node.names if f"{module}.{a.name}" in modules]
            targets = subs + ([module] if len(subs) < len(node.names) else [])
        else:
            continue
        found.update(t for t in targets if t in modules and t != name and not name.startswith(t + "."))
    return found


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return circles


@pytest.fixture(scope="module")
def graph():
    modules = project_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def test_no_import_circle(graph):
    assert import_circles(graph) == []


def test_the_circle_finder_finds_a_circle(graph):
    circled = {k: set(v) for k, v in graph.items()}
    circled["models.encoded"].add("models.windows")  # windows imports encoded already
    assert any({"models.encoded", "models.windows"} <= set(c) for c in import_circles(circled))


def test_every_family_is_a_module_of_models_families_and_every_module_there_a_family():
    folder = ROOT / "models" / "families"
    modules = sorted(p.stem for p in folder.glob("*.py") if p.name != "__init__.py")
    assert modules == sorted(families._MODULES.values())
    for name in families.FAMILIES:
        family = families.get(name)
        assert Path(family.scorer.__module__.replace(".", "/") + ".py").parent == Path("models/families"), name
        assert family.load_encoder.__module__ == f"models.families.{families._MODULES[name]}"


def test_no_family_module_outside_models_families():
    stray = [p.name for p in (ROOT / "models").glob("*.py") if "FAMILY = Family(" in p.read_text()]
    assert stray == []


def test_deployments_reach_models_only_through_its_public_names(graph):
    """No model math in deployments/: they import the models package and its typed errors, never a family."""
    for name, targets in graph.items():
        if name.startswith("deployments"):
            assert not any(t.startswith("models.families") for t in targets), (name, targets)
