"""models/ is pure PyTorch/transformers: importing every module of it loads nothing from Ray."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

MODELS = Path(__file__).resolve().parents[2] / "models"


def test_no_module_under_models_imports_ray_in_source():
    for path in MODELS.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n == "ray" or n.startswith("ray.") for n in names), f"{path} imports {names}"


def test_importing_all_of_models_loads_no_ray():
    code = ("import importlib, pkgutil, sys, models\n"
            "for m in pkgutil.walk_packages(models.__path__, 'models.'):\n"
            "    importlib.import_module(m.name)\n"
            "bad = sorted(n for n in sys.modules if n == 'ray' or n.startswith('ray.'))\n"
            "assert not bad, bad\n"
            "print('ok', len([n for n in sys.modules if n.startswith('models.')]))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=MODELS.parent, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("ok")
