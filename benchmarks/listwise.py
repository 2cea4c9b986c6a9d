"""Listwise against pairwise on the same documents: jina-reranker-v3's shape (one prompt per block of documents)
next to Qwen3-Reranker-0.6B's (one prompt per pair), in process.

    python -m benchmarks.listwise --device cpu|cuda [--docs 64,200] [--repeats 5] [--out results.json]
    python -m benchmarks.listwise --quick          # 1 layer, 1 x 16 and 1 x 48 documents, 3 repeats: for 2 cores

Both models are built with random weights and the REAL widths (benchmarks/build.py: `jina-v3-0.6b`, `qwen3-0.6b`;
`--layers N` keeps the widths and cuts the depth, in directories of their own). For each document count n, one
query and n NQ-like passages (benchmarks/workload.py; the same texts for both models) make one rank request:
`scorer.score(encoder.encode(items, one_list=True))` for jina (what /rerank sends), `scorer.score(encoder.encode(
items))` for Qwen3. Tokenization is timed with the forward. The two models alternate within each repeat (the
machine's load drifts), after one warm-up each; reported per model and n: p50 and p90 seconds of a request,
documents (pairs) scored per second at the p50, the tokens a request sends to the model, and jina/qwen3 ratios.
The scores of different models are not compared (random weights); each must be finite (jina's in [-1, 1]).
"""
from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from . import build
from .run import write_report
from .workload import nq_like_lengths

PAIRWISE = "qwen3-0.6b"


def request(n: int, seed: int = 0) -> tuple[str, list[str]]:
    """One NQ-like query and n NQ-like passages (benchmark words: one token each)."""
    vocab = build.words()
    q_len, p_len = nq_like_lengths(n, seed)
    rng = np.random.default_rng(seed + 5)
    pick = lambda k: " ".join(vocab[i] for i in rng.integers(0, len(vocab), k))  # noqa: E731
    return pick(int(q_len[0])), [pick(int(k)) for k in p_len]


def _sync(device: str) -> None:
    if device == "cuda":
        import torch
        torch.cuda.synchronize()


def run(args) -> dict:
    import torch

    import models

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="rerank-bench-"))
    dirs = {name: build.build(name, workdir, layers=args.layers) for name in (build.JINA, PAIRWISE)}
    scorers = {name: models.load_scorer(str(path), device=args.device, dtype=args.dtype,
                                        token_budget=args.token_budget) for name, path in dirs.items()}

    def call(name: str, query: str, docs: list[str]):
        scorer = scorers[name]
        items = [(query, d) for d in docs]
        batch = scorer.encoder.encode(items, one_list=True) if name == build.JINA else scorer.encoder.encode(items)
        return scorer.score(batch), batch

    report = {"device": args.device, "dtype": args.dtype, "layers": args.layers or "real (28)",
              "repeats": args.repeats, "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
              "platform": platform.platform(),
              "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
              "scorers": {name: repr(s) for name, s in scorers.items()},
              "execution": {name: s.execution for name, s in scorers.items()},
              "token_budget": {name: int(s.token_budget) for name, s in scorers.items()}, "runs": {}}
    for n in args.docs:
        query, docs = request(n, seed=n)
        seconds = {name: [] for name in scorers}
        shape = {}
        for name in scorers:  # warm-up, and what a request sends
            scores, batch = call(name, query, docs)
            scores = np.asarray(scores)
            if scores.shape != (n,) or not np.isfinite(scores).all():
                raise RuntimeError(f"{name}: {scores.shape} scores for {n} documents, or not finite")
            if name == build.JINA and np.abs(scores).max() > 1 + 1e-3:
                raise RuntimeError(f"{name}: cosines outside [-1, 1]: {scores.max()}")
            shape[name] = {"sequences": len(batch), "tokens": int(batch.num_tokens)}
        for _ in range(args.repeats):
            for name in scorers:
                _sync(args.device)
                start = time.perf_counter()
                call(name, query, docs)
                _sync(args.device)
                seconds[name].append(time.perf_counter() - start)
        entry = {}
        for name, s in seconds.items():
            p50 = statistics.median(s)
            entry[name] = {**shape[name], "seconds": s, "p50_s": p50, "p90_s": float(np.percentile(s, 90)),
                           "pairs_per_s": n / p50}
        jina, pair = entry[build.JINA], entry[PAIRWISE]
        entry["jina_over_qwen3"] = {"pairs_per_s": jina["pairs_per_s"] / pair["pairs_per_s"],
                                    "p50": jina["p50_s"] / pair["p50_s"], "tokens": jina["tokens"] / pair["tokens"]}
        report["runs"][str(n)] = entry
        print_run(n, entry)
    return report


def print_run(n: int, entry: dict) -> None:
    print(f"1 query x {n} documents")
    print(f"  {'model':<14}{'sequences':>10}{'tokens':>9}{'p50 s':>9}{'p90 s':>9}{'pairs/s':>10}")
    for name in (build.JINA, PAIRWISE):
        e = entry[name]
        print(f"  {name:<14}{e['sequences']:>10}{e['tokens']:>9}{e['p50_s']:>9.3f}{e['p90_s']:>9.3f}"
              f"{e['pairs_per_s']:>10.1f}")
    r = entry["jina_over_qwen3"]
    print(f"  jina / qwen3: pairs/s x{r['pairs_per_s']:.2f}, p50 x{r['p50']:.2f}, tokens x{r['tokens']:.2f}",
          flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.listwise", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--quick", action="store_true", help="1 layer, 1 x 16 and 1 x 48 documents, 3 repeats")
    p.add_argument("--docs", type=lambda s: [int(x) for x in s.split(",")], help="documents per request "
                                                                                 "(default 64,200)")
    p.add_argument("--layers", type=int, help="backbone depth (default: the real 28; --quick 1)")
    p.add_argument("--repeats", type=int, help="timed requests per model and size (default 5; --quick 3)")
    p.add_argument("--dtype", help="default float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--token-budget", type=int, help="both scorers' token budget (default: their own)")
    p.add_argument("--workdir", help="where models are built (reused when complete); default a temp dir")
    p.add_argument("--out", help="write the figures here as JSON")
    args = p.parse_args(argv)
    if args.docs is None:
        args.docs = [16, 48] if args.quick else [64, 200]
    if args.layers is None and args.quick:
        args.layers = 1
    if args.repeats is None:
        args.repeats = 3 if args.quick else 5
    if args.dtype is None:
        args.dtype = "float32" if args.device == "cpu" else "bfloat16"
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    report = run(args)
    report["quick"] = args.quick
    write_report(report, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
