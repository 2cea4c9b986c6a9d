"""CI smoke run of the benchmark harness: `python -m benchmarks.run --quick --device cpu` runs end to end
(model building, sentence-transformers, the in-process scorer, the HTTP service on Ray Serve) and writes
its JSON. No speed is asserted: only that every figure is there and that each path scored the same pairs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_quick_cpu_benchmark_writes_every_figure(tmp_path):
    out = tmp_path / "results.json"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--quick", "--device", "cpu", "--out", str(out),
         "--workdir", str(tmp_path / "models")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["device"] == "cpu" and report["quick"] is True
    assert list(report["models"]) == ["ettin-17m"]
    entry = report["models"]["ettin-17m"]
    for key in ("a_sentence_transformers", "b_scorer", "c_http_predict", "c_http_rerank"):
        assert entry[key]["pairs_per_s"] > 0, key
    assert entry["latency_rerank_1x100_ms"]["documents"] == 100
    assert 0 < entry["latency_rerank_1x100_ms"]["p50"] <= entry["latency_rerank_1x100_ms"]["p99"]
    assert set(entry["ratios"]) == {"b_over_a", "c_predict_over_a", "c_rerank_over_a", "c_predict_over_b"}
    assert all(isinstance(v, float) for v in entry["ratios"].values())
    # The three paths scored the same pairs: fp32 on CPU, so the raw scores agree with the reference (a).
    assert entry["b_scorer"]["vs_a"]["max_abs_diff"] <= 1e-4
    assert entry["c_http_predict"]["vs_a"]["max_abs_diff"] <= 1e-4
    # The token counts follow the NQ-like workload (short query + 60-200-token passages, a tail to ~500).
    assert 100 < entry["mean_pair_tokens"] < 260
    assert "pairs/s" in proc.stdout and "b/a" in proc.stdout
