"""Smoke run of benchmarks/shared_prefix.py: `--quick` builds the small Qwen3 shape, times shared prefixes against
"off" in process and over HTTP in the same rounds, and writes its JSON. No speed is asserted: only that every
figure is there, that both modes scored the same pairs the same, and that the HTTP model really shared."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from benchmarks import build, workload
from tests.benchmarks.test_benchmark_smoke import ROOT


def test_a_rerank_request_has_the_planned_token_counts():
    tok = build.qwen_tokenizer()
    query, instruction, docs = workload.rerank_request(build.words(), 5, seed=2)
    assert len(tok.encode(" " + query, add_special_tokens=False)) == workload.SHARED_QUERY_WORDS
    assert len(tok.encode(" " + instruction, add_special_tokens=False)) == workload.INSTRUCTION_WORDS
    assert [len(tok.encode(" " + d, add_special_tokens=False)) for d in docs] == \
        workload.nq_like_lengths(5, seed=2)[1].tolist()


@pytest.mark.slow
def test_quick_shared_prefix_benchmark_writes_every_figure(tmp_path):
    out = tmp_path / "shared.json"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-m", "benchmarks.shared_prefix", "--quick", "--out", str(out),
                           "--workdir", str(tmp_path / "models")], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    entry = report["models"]["qwen3-small"]
    assert 0.2 < entry["workload"]["prefix_share"] < 0.5  # the template, instruction and query of each request
    assert entry["workload"]["computed_share"] < 1 - entry["workload"]["prefix_share"] + 0.1
    for stage in ("in_process", "http"):
        e = entry[stage]
        assert e["auto"]["pairs_per_s"] > 0 and e["off"]["pairs_per_s"] > 0
        assert e["ratio_auto_over_off"] == e["auto"]["pairs_per_s"] / e["off"]["pairs_per_s"]
        assert e["ratio_best"] == e["auto"]["best_pairs_per_s"] / e["off"]["best_pairs_per_s"]
        assert e["max_abs_diff"] <= 1e-4  # fp32: the two modes give the same scores
    assert entry["in_process"]["shared_prefix_supported"] is True
    assert entry["http"]["shared_prefix_active"] == {"auto": True, "off": False}
    assert "prefix share" in proc.stdout and "auto/off" in proc.stdout
