"""Shared-prefix scoring (docs/API.md) against pairwise scoring of the same requests, in one run.

    python -m benchmarks.shared_prefix [--device cpu|cuda] [--quick] [--out results.json]
        [--models qwen3-small,qwen3-0.6b] [--docs 100] [--requests 4] [--rounds 5] [--concurrency 2] [--skip-http]
        [--threads N] [--model-cpus X] [--dtype bfloat16] [--workdir DIR]

Workload (benchmarks/workload.py): rerank requests of 1 query (12 words) with a task instruction (20 words) x
`--docs` NQ-like documents, every request its own query and documents; Qwen3-Reranker's template, random
weights with the real shapes (benchmarks/build.py): `qwen3-0.6b` and `qwen3-small`, which runs on 2 CPU cores.
Printed first: the workload's prefix share (the tokens of a request that are its shared prefix) and the share of
tokens the shared forwards compute.

- in process: `encode` + `score` of each request by one loaded scorer, the batch marked
  (`models.prefix.encode_marked`, what the service does with shared_prefix "auto") or not ("off");
- over HTTP: the service of `serve_app.build_app` on a local Ray Serve, the same model served twice, with
  shared_prefix "auto" and "off"; `--concurrency` clients POST `/rerank` (raw scores). `--model-cpus 1` (one
  torch thread a replica) and `--threads 1` (in process) keep OpenMP from spinning while other processes hold
  the cores.
Both modes run in the same rounds, interleaved (the order flips every round), so drift of the machine's speed
hits both alike; the figures are the medians over `--rounds` of pairs/s and the ratio is auto / off (also the
best round of each and their ratio: other processes only ever slow a round down; and pairs per CPU-second of
the processes doing the work, which other processes on the cores change least). The
scores of the two modes are compared too (max |diff|). `--quick` (CI smoke): qwen3-small, 8 documents, 2
requests, one round. Exit status 1 when a stage failed (its error is in the JSON).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

from . import build
from .run import write_report
from .workload import rerank_request

MODELS = ("qwen3-small", "qwen3-0.6b")


def requests_for(n_requests: int, n_docs: int, seed: int = 0) -> list[tuple[str, str, list[str]]]:
    """`n_requests` (query, instruction, documents): each its own query and documents, one instruction for all."""
    vocab = build.words()
    instruction = rerank_request(vocab, 1, seed=10_000 + seed)[1]
    return [(query, instruction, docs) for query, _, docs in
            (rerank_request(vocab, n_docs, seed=seed + r) for r in range(n_requests))]


def prefix_share(encoder, requests) -> dict:
    """Of the workload's pairwise tokens: the share that is a shared prefix, and the share a shared forward
    computes (each request's prefix once)."""
    from models.prefix import encode_marked

    total = own = computed = 0
    for query, instruction, docs in requests:
        batch = encode_marked(encoder, encoder.encode, [(query, d) for d in docs], instruction=instruction)
        total += batch.num_tokens
        own += int(batch.own_lengths.sum())
        computed += batch.computed_tokens
    return {"tokens": total, "prefix_share": 1 - own / total, "computed_share": computed / total,
            "mean_pair_tokens": total / sum(len(d) for _, _, d in requests)}


def _order(round_index: int) -> tuple[str, str]:
    return ("auto", "off") if round_index % 2 == 0 else ("off", "auto")


def _progress(stage: str, round_index: int, times: dict[str, list[float]], cpu: dict[str, list[float]],
              pairs: int) -> None:
    rates = {mode: pairs / seconds[-1] for mode, seconds in times.items()}
    per_cpu = {mode: pairs / seconds[-1] for mode, seconds in cpu.items()}
    print(f"  {stage} round {round_index + 1}: auto {rates['auto']:.1f}, off {rates['off']:.1f} pairs/s "
          f"({rates['auto'] / rates['off']:.2f}x); per CPU-second {per_cpu['auto']:.1f}, {per_cpu['off']:.1f} "
          f"({per_cpu['auto'] / per_cpu['off']:.2f}x)", flush=True)


def _summary(times: dict[str, list[float]], cpu: dict[str, list[float]], pairs: int) -> dict:
    """pairs/s: medians and the best rounds (other processes only ever slow a round down, so the best round of
    each mode is another estimate of its speed on a machine to itself); and pairs per CPU-second of the processes
    doing the work (median), which other processes on the cores do not change (with one torch thread: several
    spin-wait in each other's barriers while the cores are taken, which counts as CPU time)."""
    out = {}
    for mode, seconds in times.items():
        rates = [pairs / s for s in seconds]
        efficiency = [pairs / c for c in cpu[mode]]
        out[mode] = {"pairs_per_s": statistics.median(rates), "best_pairs_per_s": max(rates),
                     "pairs_per_cpu_s": statistics.median(efficiency), "rounds_pairs_per_s": rates,
                     "seconds": seconds, "cpu_seconds": cpu[mode]}
    out["ratio_auto_over_off"] = out["auto"]["pairs_per_s"] / out["off"]["pairs_per_s"]
    out["ratio_best"] = out["auto"]["best_pairs_per_s"] / out["off"]["best_pairs_per_s"]
    out["ratio_per_cpu_s"] = out["auto"]["pairs_per_cpu_s"] / out["off"]["pairs_per_cpu_s"]
    return out


def bench_in_process(model_dir: Path, requests, *, device: str, dtype: str, rounds: int) -> dict:
    import models
    from models.prefix import encode_marked

    encoder = models.load_encoder(str(model_dir))
    scorer = models.load_scorer(str(model_dir), device=device, dtype=dtype)

    def run(mode: str) -> list[np.ndarray]:
        out = []
        for query, instruction, docs in requests:
            items = [(query, d) for d in docs]
            batch = (encode_marked(encoder, encoder.encode, items, instruction=instruction) if mode == "auto"
                     else encoder.encode(items, instruction=instruction))
            out.append(scorer.score(batch))
        return out

    scores = {mode: run(mode) for mode in ("auto", "off")}  # warm-up, and the scores compared
    times, cpu = {"auto": [], "off": []}, {"auto": [], "off": []}
    pairs = sum(len(d) for _, _, d in requests)
    for r in range(rounds):
        for mode in _order(r):
            start, used = time.perf_counter(), time.process_time()
            run(mode)
            times[mode].append(time.perf_counter() - start)
            cpu[mode].append(time.process_time() - used)
        _progress("in process", r, times, cpu, pairs)
    out = _summary(times, cpu, pairs)
    out["max_abs_diff"] = float(max(np.abs(a - b).max() for a, b in zip(scores["auto"], scores["off"])))
    out["scorer"] = repr(scorer)
    out["shared_prefix_supported"] = bool(scorer.supports_shared_prefix)
    return out


def bench_http(model_dir: Path, requests, *, device: str, dtype: str, rounds: int, concurrency: int,
               model_cpus: float | None = None) -> dict:
    from serve_app.settings import deployment_name

    from .capacity import _proc_cpu_seconds
    from .run import Service, _post_all

    names = {"auto": "shared-prefix", "off": "pairwise"}
    # The service's processes: the model replica of the mode, the ingress (tokenization) and Ray's HTTP proxy.
    titles = {mode: (f"ray::ServeReplica:benchmark:{deployment_name(name)}", "ray::ServeReplica:benchmark:ingress",
                     "ray::ProxyActor") for mode, name in names.items()}
    service = Service({names["auto"]: model_dir, names["off"]: model_dir}, device=device, dtype=dtype,
                      token_budget=None, model_cpus=model_cpus, model_settings={names["off"]: {"shared_prefix": "off"}})
    try:
        import httpx

        bodies = {mode: [json.dumps({"model": name, "query": q, "instruction": i, "texts": docs,
                                     "raw_scores": True}).encode() for q, i, docs in requests]
                  for mode, name in names.items()}
        url = service.url + "/rerank"
        responses = {mode: _post_all(url, bodies[mode], 1)[1] for mode in names}  # warm-up, scores compared
        info = {m["name"]: m for m in httpx.get(service.url + "/info", timeout=60).json()["models"]}
        times, cpu = {"auto": [], "off": []}, {"auto": [], "off": []}
        pairs = sum(len(d) for _, _, d in requests)
        for r in range(rounds):
            for mode in _order(r):
                used = sum(map(_proc_cpu_seconds, titles[mode]))
                seconds, _ = _post_all(url, bodies[mode], concurrency, parse=False)
                times[mode].append(seconds)
                cpu[mode].append(max(sum(map(_proc_cpu_seconds, titles[mode])) - used, 1e-3))
            _progress("HTTP", r, times, cpu, pairs)
        out = _summary(times, cpu, pairs)
        diffs = []
        for a, b in zip(responses["auto"], responses["off"]):
            by_index = {x["index"]: x["score"] for x in b}
            diffs += [abs(x["score"] - by_index[x["index"]]) for x in a]
        out["max_abs_diff"] = float(max(diffs))
        out["shared_prefix_active"] = {mode: info[name]["shared_prefix_active"] for mode, name in names.items()}
        out["concurrency"], out["requests_per_round"] = concurrency, len(requests)
        return out
    finally:
        service.close()


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.shared_prefix", description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--quick", action="store_true", help="CI smoke: qwen3-small, 8 documents, 2 requests, 1 round")
    ap.add_argument("--out", help="write the figures here as JSON")
    ap.add_argument("--models", type=lambda s: s.split(","), help=f"comma-separated, from {','.join(MODELS)} "
                                                                  "(default: qwen3-small on CPU, both on CUDA)")
    ap.add_argument("--docs", type=int, help="documents per request (default 100; --quick 8)")
    ap.add_argument("--requests", type=int, help="requests per round (default 4 on CPU, 32 on CUDA; --quick 2)")
    ap.add_argument("--rounds", type=int, help="interleaved timed rounds (default 5; --quick 1)")
    ap.add_argument("--concurrency", type=int, default=2, help="concurrent HTTP clients")
    ap.add_argument("--threads", type=int, help="torch threads in process (default: torch's)")
    ap.add_argument("--model-cpus", type=float, help="num_cpus (and torch threads) of each model replica (default: "
                                                     "the service's default)")
    ap.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="default fp32 CPU, bf16 GPU")
    ap.add_argument("--workdir", help="where models are built (reused when complete); default a temp dir")
    ap.add_argument("--skip-http", action="store_true", help="in process only")
    args = ap.parse_args(argv)
    if args.models is None:
        args.models = ["qwen3-small"] if (args.quick or args.device == "cpu") else list(MODELS)
    args.docs = args.docs or (8 if args.quick else 100)
    args.requests = args.requests or (2 if args.quick else (4 if args.device == "cpu" else 32))
    args.rounds = args.rounds or (1 if args.quick else 5)
    args.dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")
    return args


def _stage(entry: dict, key: str, fn):
    try:
        entry[key] = fn()
    except Exception as exc:  # noqa: BLE001 - recorded; the exit status says that a stage failed
        entry[key] = {"error": f"{type(exc).__name__}: {exc}"}
        traceback.print_exc()
    return entry[key]


def run(args) -> dict:
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    if args.threads:
        torch.set_num_threads(args.threads)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="rerank-bench-"))
    requests = requests_for(args.requests, args.docs)
    report = {"device": args.device, "quick": args.quick, "torch": torch.__version__,
              "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
              "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
              "settings": {k: v for k, v in vars(args).items() if k != "out"}, "models": {}}
    for name in args.models:
        entry = report["models"][name] = {}
        path = _stage(entry, "build", lambda: str(build.build(name, workdir)))
        if isinstance(path, dict):
            continue
        import models
        share = _stage(entry, "workload", lambda: prefix_share(models.load_encoder(path), requests))
        if "error" not in share:
            print(f"{name}: {args.requests} requests x {args.docs} documents, {share['mean_pair_tokens']:.0f} tokens "
                  f"a pair; prefix share {share['prefix_share']:.1%}, shared forwards compute "
                  f"{share['computed_share']:.1%} of the tokens", flush=True)
        _stage(entry, "in_process", lambda: bench_in_process(Path(path), requests, device=args.device,
                                                             dtype=args.dtype, rounds=args.rounds))
        if not args.skip_http:
            _stage(entry, "http", lambda: bench_http(Path(path), requests, device=args.device, dtype=args.dtype,
                                                     rounds=args.rounds, concurrency=args.concurrency,
                                                     model_cpus=args.model_cpus))
    return report


def print_table(report: dict) -> None:
    print(f"\n{'model':12s} {'stage':11s} {'auto':>9s} {'off':>9s} {'auto/off':>9s} {'best a/o':>9s} "
          f"{'cpu a/o':>8s} {'max|diff|':>10s}   (pairs/s, medians of interleaved rounds; best: the best round of "
          f"each; cpu: pairs per CPU-second)")
    for name, entry in report["models"].items():
        for stage in ("in_process", "http"):
            e = entry.get(stage)
            if not e:
                continue
            if "error" in e:
                print(f"{name:12s} {stage:11s} ERROR {e['error']}")
                continue
            print(f"{name:12s} {stage:11s} {e['auto']['pairs_per_s']:9.1f} {e['off']['pairs_per_s']:9.1f} "
                  f"{e['ratio_auto_over_off']:9.2f} {e['ratio_best']:9.2f} {e['ratio_per_cpu_s']:8.2f} "
                  f"{e['max_abs_diff']:10.1e}")


def failed(report: dict) -> bool:
    return any(isinstance(v, dict) and "error" in v for e in report["models"].values() for v in e.values())


def main(argv=None) -> int:
    args = parse_args(argv)
    report = run(args)
    print_table(report)
    write_report(report, args.out)
    return 1 if failed(report) else 0


if __name__ == "__main__":
    sys.exit(main())
