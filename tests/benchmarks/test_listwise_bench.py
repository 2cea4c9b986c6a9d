"""Smoke run of the listwise benchmark (benchmarks/listwise.py): both real-width models are built (one layer), one
rank request of each size is scored by each, and every figure lands in the JSON. No speed is asserted."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_listwise_benchmark_writes_every_figure(tmp_path):
    out = tmp_path / "listwise.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.listwise", "--quick", "--docs", "4,12", "--repeats", "1",
         "--workdir", str(tmp_path / "models"), "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["quick"] is True and report["layers"] == 1 and set(report["runs"]) == {"4", "12"}
    for n, entry in report["runs"].items():
        jina, qwen = entry["jina-v3-0.6b"], entry["qwen3-0.6b"]
        assert jina["sequences"] == 1 and qwen["sequences"] == int(n)  # one block; one prompt per pair
        assert jina["tokens"] < qwen["tokens"]  # the query and the template once, not once per document
        for e in (jina, qwen):
            assert e["pairs_per_s"] > 0 and 0 < e["p50_s"] <= e["p90_s"] and len(e["seconds"]) == 1
        assert set(entry["jina_over_qwen3"]) == {"pairs_per_s", "p50", "tokens"}
    assert "jina / qwen3" in proc.stdout


def test_the_benchmark_request_and_tokenizer_are_exact():
    """The jina benchmark tokenizer keeps every benchmark word one token and the markers single tokens, so a
    request's token counts are the workload's."""
    from benchmarks import build, listwise, workload

    tok = build.jina_tokenizer()
    assert all(len(tok.tokenize(m)) == 1 for m in build.JINA_MARKERS)
    query, docs = listwise.request(6, seed=6)
    q_len, p_len = workload.nq_like_lengths(6, seed=6)
    assert len(tok.encode(" " + query, add_special_tokens=False)) == q_len[0]
    assert [len(tok.encode(" " + d, add_special_tokens=False)) for d in docs] == p_len.tolist()
