"""Long documents (docs/API.md): the cost of `long_documents: "chunk"` next to plain truncation, in process.

    python -m benchmarks.long_docs [--docs 100] [--doc-tokens 2000] [--model ettin-17m] [--max-length 512]
                                   [--device cpu] [--repeats 1] [--out results.json]

The same documents (NQ-like queries of 8-16 tokens, documents of ~`--doc-tokens` tokens made of benchmark words
that are one token each) are scored by `scorer.score(encoder.encode(pairs))` (truncate: every pair cut to
max_length) and by `encode_windows(encoder, pairs)` + `scorer.score` + `reduce` (chunk: every window scored).
Both are timed end to end (tokenization included), interleaved, after one warm-up each. Chunking should cost
its windows' tokens and no more: window-tokens/s of chunk ≈ tokens/s of truncate.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from . import build
from .workload import nq_like_lengths


def make_long_pairs(n: int, doc_tokens: int, seed: int = 0) -> list[tuple[str, str]]:
    """n (query, document) pairs: NQ-like query lengths, documents of doc_tokens ± 10% benchmark words."""
    vocab = build.words()
    q_len, _ = nq_like_lengths(n, seed)
    rng = np.random.default_rng(seed + 11)
    d_len = rng.integers(int(doc_tokens * 0.9), int(doc_tokens * 1.1) + 1, n)
    pick = lambda k: " ".join(vocab[i] for i in rng.integers(0, len(vocab), k))  # noqa: E731
    return [(pick(q), pick(d)) for q, d in zip(q_len, d_len)]


def _sync(device: str) -> None:
    if device == "cuda":
        import torch
        torch.cuda.synchronize()


def run(args) -> dict:
    import torch

    import models
    from models.windows import encode_windows

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="rerank-bench-"))
    model_dir = build.build(args.model, workdir)
    encoder = models.load_encoder(str(model_dir), max_length=args.max_length)
    scorer = models.load_scorer(str(model_dir), device=args.device, dtype=args.dtype, max_length=args.max_length)
    pairs = make_long_pairs(args.docs, args.doc_tokens, args.seed)
    doc_tokens = [len(x) for x in encoder.plain_tokens([d for _, d in pairs])]

    def truncate():
        batch = encoder.encode(pairs)
        return scorer.score(batch), batch.num_tokens, len(batch)

    def chunk():
        windowed = encode_windows(encoder, pairs, chunk_overlap=args.chunk_overlap, max_chunks=args.max_chunks)
        return windowed.reduce(scorer.score(windowed.batch)), windowed.num_tokens, len(windowed.batch)

    runs = {"truncate": truncate, "chunk": chunk}
    seconds: dict[str, list[float]] = {k: [] for k in runs}
    results = {k: fn() for k, fn in runs.items()}  # warm-up
    for _ in range(args.repeats):
        for name, fn in runs.items():
            _sync(args.device)
            start = time.perf_counter()
            results[name] = fn()
            _sync(args.device)
            seconds[name].append(time.perf_counter() - start)
    # Tokenization alone, to show where the time goes.
    start = time.perf_counter()
    encoder.encode(pairs)
    encode_truncate_s = time.perf_counter() - start
    start = time.perf_counter()
    encode_windows(encoder, pairs, chunk_overlap=args.chunk_overlap, max_chunks=args.max_chunks)
    encode_chunk_s = time.perf_counter() - start

    report = {"model": args.model, "device": args.device, "dtype": str(scorer.dtype), "max_length": encoder.max_length,
              "docs": args.docs, "doc_tokens_mean": float(np.mean(doc_tokens)), "chunk_overlap": args.chunk_overlap,
              "max_chunks": args.max_chunks, "repeats": args.repeats, "torch_threads": torch.get_num_threads(),
              "platform": platform.platform(), "runs": {}}
    for name in runs:
        raw, tokens, sequences = results[name]
        median = statistics.median(seconds[name])
        report["runs"][name] = {"seconds": seconds[name], "pairs_per_s": args.docs / median,
                                "sequences": int(sequences), "tokens": int(tokens), "tokens_per_s": tokens / median,
                                "encode_s": encode_truncate_s if name == "truncate" else encode_chunk_s}
    t, c = report["runs"]["truncate"], report["runs"]["chunk"]
    report["chunk_over_truncate"] = {"tokens": c["tokens"] / t["tokens"], "pairs_per_s": c["pairs_per_s"] / t["pairs_per_s"],
                                     "tokens_per_s": c["tokens_per_s"] / t["tokens_per_s"]}
    # The max over windows includes the first window, which is the truncated input: never lower (up to fp noise).
    report["chunk_minus_truncate_min"] = float(np.min(results["chunk"][0] - results["truncate"][0]))
    return report


def print_table(report: dict) -> None:
    print(f"{report['model']} {report['device']} {report['dtype']}, max_length {report['max_length']}, "
          f"{report['docs']} documents of {report['doc_tokens_mean']:.0f} tokens mean")
    print(f"{'mode':<10}{'sequences':>10}{'tokens':>10}{'pairs/s':>10}{'tokens/s':>11}{'encode s':>10}")
    for name, r in report["runs"].items():
        print(f"{name:<10}{r['sequences']:>10}{r['tokens']:>10}{r['pairs_per_s']:>10.2f}{r['tokens_per_s']:>11.0f}"
              f"{r['encode_s']:>10.3f}")
    ratio = report["chunk_over_truncate"]
    print(f"chunk / truncate: tokens x{ratio['tokens']:.2f}, pairs/s x{ratio['pairs_per_s']:.3f}, "
          f"tokens/s x{ratio['tokens_per_s']:.3f}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="ettin-17m", choices=["ettin-17m", "ettin-150m"])
    p.add_argument("--docs", type=int, default=100)
    p.add_argument("--doc-tokens", type=int, default=2000)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--chunk-overlap", type=int, default=64)
    p.add_argument("--max-chunks", type=int, default=32)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    report = run(args)
    print_table(report)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
