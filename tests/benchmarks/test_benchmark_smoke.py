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


def run_quick(tmp_path, *args: str) -> tuple[dict, str]:
    """(the JSON report, stdout) of `python -m benchmarks.run --quick --device cpu *args`, which must succeed."""
    out = tmp_path / "results.json"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--quick", "--device", "cpu", *args, "--out", str(out),
         "--workdir", str(tmp_path / "models")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


@pytest.mark.slow
def test_quick_cpu_benchmark_writes_every_figure(tmp_path):
    report, stdout = run_quick(tmp_path)
    assert report["device"] == "cpu" and report["quick"] is True
    assert list(report["models"]) == ["ettin-17m"]
    entry = report["models"]["ettin-17m"]
    for key in ("a_sentence_transformers", "b_scorer", "c_http_predict", "c_http_rerank"):
        assert entry[key]["pairs_per_s"] > 0, key
    assert entry["latency_rerank_1x100_ms"]["documents"] == 100
    assert 0 < entry["latency_rerank_1x100_ms"]["p50"] <= entry["latency_rerank_1x100_ms"]["p99"]
    assert set(entry["ratios"]) == {"b_over_a", "c_predict_over_a", "c_rerank_over_a", "c_predict_over_b",
                                    "c_predict_over_a_at_32", "c_rerank_over_a_at_32"}
    # (a) at each batch size, the best one reported; the service ran with its default layout.
    by_size = entry["a_sentence_transformers"]["by_batch_size"]
    assert set(by_size) == {"32", "128", "512"}
    assert entry["a_sentence_transformers"]["pairs_per_s"] == max(by_size.values())
    assert report["settings"]["model_replicas"] is None and report["settings"]["model_cpus"] is None
    assert all(isinstance(v, float) for v in entry["ratios"].values())
    # The three paths scored the same pairs: fp32 on CPU, so the raw scores agree with the reference (a).
    assert entry["b_scorer"]["vs_a"]["max_abs_diff"] <= 1e-4
    assert entry["c_http_predict"]["vs_a"]["max_abs_diff"] <= 1e-4
    # The token counts follow the NQ-like workload (short query + 60-200-token passages, a tail to ~500).
    assert 100 < entry["mean_pair_tokens"] < 260
    assert "pairs/s" in stdout and "b/a" in stdout


@pytest.mark.slow
def test_quick_capacity_mode_scales_ingress_replicas(tmp_path):
    """`--capacity`: the Ingress over a no-forward model, 1..2 ingress replicas, next to the one-core encode rate."""
    # 16 requests a replica count: enough ingress CPU time to read from /proc (10 ms ticks).
    report, stdout = run_quick(tmp_path, "--capacity", "--max-ingress-replicas", "2", "--requests", "16")
    cap = report["models"]["ettin-17m"]["capacity"]
    assert cap["encode_one_core"]["pairs_per_s"] > 0
    for route in ("predict", "rerank"):
        assert set(cap[route]) == {"1", "2"}
        for m in cap[route].values():
            assert m["pairs_per_s"] > 0 and m["ingress_cpu_s"] > 0  # the ingress processes were found in /proc
            assert m["per_ingress_cpu_over_encode_one_core"] > 0 and m["scaling_vs_1"] > 0
    assert "pairs/ingress cpu-s" in stdout
