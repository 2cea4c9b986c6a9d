"""Ray Serve application serving rerankers over HTTP (docs/API.md). `serve run serve_app:build_app` or a config.

Only builder.py needs Ray at import; it is imported on first use of `build_app` / `deployment_options`, so
the HTTP layer (routes, schemas, service, settings) imports without Ray (tests/serve_app/test_no_ray.py).
"""
from serve_app.settings import AppSettings, ModelSettings

__all__ = ["build_app", "deployment_options", "AppSettings", "ModelSettings"]


def __getattr__(name: str):
    if name in ("build_app", "deployment_options"):
        from serve_app import builder

        return getattr(builder, name)
    raise AttributeError(f"module 'serve_app' has no attribute {name!r}")
