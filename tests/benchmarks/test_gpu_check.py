"""CI smoke of `python -m benchmarks.gpu_check` in its CPU mode: every stage runs and lands in one JSON. No GPU
figures here (there is no GPU); on a GPU machine the same command runs with --device cuda."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_cpu_quick_mode_runs_every_stage_into_one_json(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("TOKENIZERS_PARALLELISM", None)
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_check", "--device", "cpu", "--quick", "--skip-http",
         "--tests", "tests/models/test_attention.py", "--variants", "modernbert_cls,qwen3_tied",
         "--workdir", str(tmp_path / "models"), "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["device"] == "cpu" and report["env"]["torch"]
    assert report["env"]["TOKENIZERS_PARALLELISM"] is None  # the check never turns tokenizer threads off
    assert report["env"]["varlen_kernels"]["torch_varlen"] is not None  # what this torch's varlen_attn takes
    assert list(report["stages"]) == ["tests", "agreement", "harness:ettin-17m"]
    assert all(s["status"] == "ok" for s in report["stages"].values()), report["stages"]
    assert report["failed"] == []
    assert report["stages"]["tests"]["counts"].get("failed", 0) == 0
    variants = report["stages"]["agreement"]["result"]["variants"]
    assert set(variants) == {"modernbert_cls", "qwen3_tied"}
    for row in variants.values():
        for dtype in ("float16", "bfloat16"):
            assert row[dtype]["pearson"] > 0.99 and row[dtype]["finite"]
        assert row["float32_packed"]["execution"] == "packed" and row["float32_packed"]["max_abs_diff"] < 1e-5
    harness = report["stages"]["harness:ettin-17m"]["report"]["models"]["ettin-17m"]
    assert harness["b_scorer"]["pairs_per_s"] > 0 and harness["b_scorer"]["vs_a"]["max_abs_diff"] <= 1e-4
    assert "max|diff|" in proc.stdout and "b/a" in proc.stdout


def test_a_stage_past_its_limit_is_killed_and_recorded():
    from benchmarks.gpu_check import _run

    start = time.monotonic()
    r = _run([sys.executable, "-c", "import time; time.sleep(60)"], 1.5, capture=True)
    assert r["status"] == "timed_out" and r["rc"] is None
    assert time.monotonic() - start < 20
