"""Ray Serve application serving rerankers over HTTP (API.md). `serve run serve_app:build_app` or a config."""
from serve_app.builder import build_app, deployment_options
from serve_app.settings import AppSettings, ModelSettings

__all__ = ["build_app", "deployment_options", "AppSettings", "ModelSettings"]
