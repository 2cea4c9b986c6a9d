"""The HTTP-layer micro-benchmark (benchmarks/routes.py) runs every route it times (each answers 200)."""
from __future__ import annotations

import asyncio
import types

from benchmarks import routes


def test_every_case_runs_and_gives_a_time():
    out = asyncio.run(routes._run(types.SimpleNamespace(texts=8, requests=2, repeats=1)))
    assert set(out) == {"/rerank", "/rerank return_text", "/v2/rerank return_documents", "/predict batch",
                        "/tokenize"}
    assert all(ms > 0 for ms in out.values())
