"""The multi-model benchmark (benchmarks/multi_model.py): its workload, and a CI smoke run of `--quick`.
No speed is asserted: only that both layouts served every request and the report has every figure."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from benchmarks.multi_model import LAYOUTS, ROUTES, make_requests
from tests.conftest import REPO_ROOT


def test_the_mixed_load_is_seeded_and_mixes_models_routes_and_sizes():
    models = ["a", "b", "c"]
    reqs = make_requests(models, 300, seed=0)
    assert [r["body"] for r in reqs] == [r["body"] for r in make_requests(models, 300, seed=0)]  # same load each time
    assert {r["model"] for r in reqs} == set(models) and {r["route"] for r in reqs} == set(ROUTES)
    assert min(r["pairs"] for r in reqs) == 1 and max(r["pairs"] for r in reqs) == 64
    for r in reqs:
        body = json.loads(r["body"])
        docs = body.get("texts") or body.get("documents") or body.get("inputs")
        assert body["model"] == r["model"] and len(docs) == r["pairs"]
        if r["route"] == "/predict":
            assert all(len(pair) == 2 for pair in docs)  # pairs: every family scores them (Qwen3 needs them)


def test_hand_layouts_are_explicit_and_the_defaults_set_nothing():
    assert LAYOUTS["defaults"] == ({}, {})
    assert LAYOUTS["one-thread"][0] == {"num_cpus": 0.5}


@pytest.mark.slow
def test_quick_run_serves_every_request_in_both_layouts(tmp_path):
    out = tmp_path / "multi.json"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(REPO_ROOT)}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-m", "benchmarks.multi_model", "--quick", "--overhead", "--out", str(out),
                           "--workdir", str(tmp_path / "models")],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["errors"] == [] and set(report["layouts"]) == {"defaults", "one-thread"}
    for run in report["rounds"]:
        assert run["failures"] == 0 and run["requests"] == 24 and run["requests_per_s"] > 0
        assert 0 < run["p50_ms"] <= run["p99_ms"]
        froms = {r["torch_threads_from"] for r in run["replicas"].values()}
        assert froms == ({"node share"} if run["layout"] == "defaults" else {"num_cpus"})
    assert report["defaults_vs_best_hand"]["best_hand_layout"] == "one-thread"
    assert report["overhead"]["cpu_share_forward_us"] > 0
    assert "defaults / best hand layout" in proc.stdout
