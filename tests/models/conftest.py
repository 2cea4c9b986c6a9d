"""Tiny random-weight models in the real on-disk layouts, built once per test session."""
from __future__ import annotations

import pytest

from tests.tiny_models import build_all, cached_scorers


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """{variant name: model directory} for every builder in tests.tiny_models.BUILDERS."""
    return build_all(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def scorers(tiny):
    """Loaded fp32 CPU scorers, one per variant, loaded on first use."""
    return cached_scorers(tiny)
