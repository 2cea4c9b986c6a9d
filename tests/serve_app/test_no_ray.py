"""serve_app/'s HTTP layer has no Ray: only builder.py imports it at module level (deployments/ holds the rest)."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

SERVE_APP = Path(__file__).resolve().parents[2] / "serve_app"
RAY_AT_IMPORT = {"builder.py"}  # builds the Ray Serve application


def _top_level_imports(path: Path) -> list[str]:
    names = []
    for node in ast.parse(path.read_text(), str(path)).body:  # module level only: lazy imports are fine
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names.append(node.module or "")
    return names


def test_only_the_builder_imports_ray_at_module_level():
    for path in sorted(SERVE_APP.glob("*.py")):
        if path.name in RAY_AT_IMPORT:
            continue
        names = _top_level_imports(path)
        assert not any(n == "ray" or n.startswith(("ray.", "deployments")) for n in names), f"{path} imports {names}"


def test_importing_the_http_layer_loads_no_ray():
    code = ("import sys\n"
            "import serve_app, serve_app.routes, serve_app.schemas, serve_app.service, serve_app.settings, "
            "models.cutting\n"
            "bad = sorted(n for n in sys.modules if n == 'ray' or n.startswith('ray.'))\n"
            "assert not bad, bad[:10]\n"
            "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=SERVE_APP.parent, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("ok")
