"""Side-by-side speed: sentence-transformers (a), this project's scorer in-process (b), the HTTP service (c).

    python -m benchmarks.run --device cpu|cuda [--quick] [--out results.json]
    python -m benchmarks.run --capacity [--max-ingress-replicas N]   # serving capacity, no model forward

Offline: random-weight models with the real shapes (benchmarks/build.py), NQ-like token counts
(benchmarks/workload.py). For each model, in one run:
  (a) sentence-transformers `CrossEncoder.predict` in-process (fp32 on CPU; bf16 on GPU with flash-attn 2
      when installed, else SDPA), raw scores, at each of --st-batch-sizes (32, 128, 512); (a) is the best;
  (b) `models.load_scorer(dir).score(models.load_encoder(dir).encode(pairs))`, encode + score timed;
  (c) the Ray Serve application of `serve_app.build_app` over HTTP, with the service's DEFAULT layout unless
      --model-replicas / --model-cpus are given: concurrent clients POST `/predict` and `/rerank` with
      `--pairs-per-request` pairs each; and the latency p50/p99 of one query x 100 documents via `/rerank`.
--capacity measures the tokenizing tier instead (benchmarks/capacity.py): the service's Ingress in front of a
benchmark-only model that does no forward, for 1..N ingress replicas, next to Encoder.encode on one core.
Prints pairs/s and the ratios b/a, c/a; writes every figure as JSON. The exit status is 1 when a stage failed
(its error is in the JSON). --quick (CI smoke): ettin-17m only, few pairs, one repeat; asserts nothing.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import socket
import statistics
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

import numpy as np

from . import build
from .workload import nq_like_lengths

QWEN = "qwen3-0.6b"


# --- workload as text ---------------------------------------------------------------------------------------

def make_pairs(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """n (query, passage) pairs whose token counts follow the NQ-like distribution exactly."""
    vocab = build.words()
    q_len, p_len = nq_like_lengths(n, seed)
    rng = np.random.default_rng(seed + 7)
    pick = lambda k: " ".join(vocab[i] for i in rng.integers(0, len(vocab), k))  # noqa: E731
    return [(pick(q), pick(p)) for q, p in zip(q_len, p_len)]


def qwen_st_pairs(pairs):
    """Qwen3-Reranker's template split in two halves for CrossEncoder.predict: the Qwen tokenizer adds no special
    tokens and joins a pair as-is, so ST sees exactly the tokens the official recipe (and our encoder) builds."""
    from models.families.qwen3 import DEFAULT_INSTRUCTION, PREFIX, SUFFIX
    return [(f"{PREFIX}<Instruct>: {DEFAULT_INSTRUCTION}\n<Query>: {q}", f"\n<Document>: {d}{SUFFIX}")
            for q, d in pairs]


# --- helpers ------------------------------------------------------------------------------------------------

def _sync(device: str) -> None:
    if device == "cuda":
        import torch
        torch.cuda.synchronize()


def _timed(fn, repeats: int, device: str, warm_up: bool = True):
    """(median seconds, all seconds, last result) after one untimed warm-up call (unless warm_up=False)."""
    result = fn() if warm_up else None
    seconds = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        result = fn()
        _sync(device)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), seconds, result


def _agreement(x, ref) -> dict:
    x, ref = np.asarray(x, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    out = {"max_abs_diff": float(np.max(np.abs(x - ref)))}
    if len(x) > 1 and np.std(x) > 0 and np.std(ref) > 0:
        out["pearson"] = float(np.corrcoef(x, ref)[0, 1])
    return out


def _free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        import torch
        torch.cuda.empty_cache()


# --- (a) sentence-transformers ------------------------------------------------------------------------------

def st_attention(device: str) -> str:
    if device == "cuda":
        import importlib.util
        if importlib.util.find_spec("flash_attn") is not None:
            return "flash_attention_2"
    return "sdpa"


def bench_sentence_transformers(model_dir: Path, pairs, *, device: str, dtype: str, repeats: int,
                                batch_sizes: list[int]) -> dict:
    """CrossEncoder.predict at each batch size; the figures of the best one, and every one under `by_batch_size`."""
    import torch
    from sentence_transformers import CrossEncoder

    attn = st_attention(device)
    ce = CrossEncoder(str(model_dir), device=device, local_files_only=True,
                      model_kwargs={"dtype": getattr(torch, dtype), "attn_implementation": attn})
    by_size, scores = {}, None
    for batch_size in batch_sizes:
        predict = lambda: ce.predict(pairs, batch_size=batch_size, activation_fn=torch.nn.Identity(),  # noqa: E731
                                     show_progress_bar=False)
        # The model is warm after the first size: later sizes are timed without a warm-up call of their own.
        median, seconds, scores = _timed(predict, repeats, device, warm_up=not by_size)
        by_size[batch_size] = {"pairs_per_s": len(pairs) / median, "seconds": seconds}
        print(f"  (a) batch {batch_size}: {len(pairs) / median:.1f} pairs/s", flush=True)
    best = max(by_size, key=lambda b: by_size[b]["pairs_per_s"])
    out = {**by_size[best], "dtype": dtype, "attn_implementation": attn, "batch_size": best,
           "by_batch_size": {str(b): v["pairs_per_s"] for b, v in by_size.items()}}
    batch_size = best
    del ce
    _free(device)
    reference = None
    if dtype != "float32":  # the fp32 reference (SDPA) that low-precision scores are judged against
        ce = CrossEncoder(str(model_dir), device=device, local_files_only=True,
                          model_kwargs={"dtype": torch.float32, "attn_implementation": "sdpa"})
        reference = np.asarray(ce.predict(pairs, batch_size=batch_size, activation_fn=torch.nn.Identity(),
                                          show_progress_bar=False), dtype=np.float64)
        out["vs_fp32"] = _agreement(scores, reference)
        del ce
        _free(device)
    return out, np.asarray(scores, dtype=np.float64), reference


# --- (b) this project's scorer ------------------------------------------------------------------------------

def bench_scorer(model_dir: Path, pairs, *, device: str, dtype: str, repeats: int, token_budget: int | None):
    import models

    encoder = models.load_encoder(str(model_dir))
    scorer = models.load_scorer(str(model_dir), device=device, dtype=dtype, token_budget=token_budget)
    encode_and_score = lambda: scorer.score(encoder.encode(pairs))  # noqa: E731
    median, seconds, scores = _timed(encode_and_score, repeats, device)
    batch = encoder.encode(pairs)
    score_median, _, _ = _timed(lambda: scorer.score(batch), repeats, device)
    out = {"pairs_per_s": len(pairs) / median, "seconds": seconds, "score_only_pairs_per_s": len(pairs) / score_median,
           "dtype": str(scorer.dtype), "token_budget": int(scorer.token_budget), "tokens": int(batch.num_tokens),
           "scorer": repr(scorer)}
    del scorer, encoder
    _free(device)
    return out, np.asarray(scores, dtype=np.float64)


# --- (c) the HTTP service -----------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Service:
    """serve_app.build_app on a local Ray Serve instance, in this process; `close()` shuts it all down."""

    def __init__(self, model_dirs: dict[str, Path], *, device: str, dtype: str, token_budget: int | None,
                 model_cpus: float | None = None, model_replicas: int | None = None, timeout_s: float = 600,
                 start_app: bool = True, model_settings: dict[str, dict] | None = None):
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        import ray
        from ray import serve

        from serve_app import build_app

        # Logical CPUs: the machine's, as a plain `serve run` sees them; with an explicit layout, enough for
        # what the model replicas reserve plus the ingress.
        # address="local": a cluster of our own, never one that another process (a test session) started.
        num_cpus = None
        if model_cpus is not None or model_replicas is not None:
            reserved = math.ceil((model_cpus or 1.0) * (model_replicas or 1) * len(model_dirs))
            num_cpus = max(os.cpu_count() or 1, reserved) + 1
        ray.init(address="local", num_cpus=num_cpus,
                 include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        self.port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": self.port})
        self.url = f"http://127.0.0.1:{self.port}"
        if not start_app:
            return
        specs = []
        for name, path in model_dirs.items():
            spec = {"name": name, "model_id": str(path), "dtype": dtype, "device": device}
            if model_cpus is not None:
                spec["num_cpus"] = model_cpus
            if model_replicas is not None:
                spec["num_replicas"] = model_replicas
            if device == "cuda":
                spec["num_gpus"] = 1.0 / len(model_dirs)
            if token_budget:
                spec["token_budget"] = token_budget
            spec.update((model_settings or {}).get(name, {}))  # any other per-model setting, by model name
            specs.append(spec)
        serve.run(build_app({"models": specs}), name="benchmark", route_prefix="/", blocking=False)
        self._wait_healthy(timeout_s)

    def _wait_healthy(self, timeout_s: float) -> None:
        import httpx
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"the service did not become healthy within {timeout_s:.0f} s")

    def close(self) -> None:
        import ray
        from ray import serve
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def write_report(report: dict, out: str | None) -> None:
    """The benchmark's figures as JSON at `out` (nothing without one)."""
    if out:
        Path(out).write_text(json.dumps(report, indent=2))
        print(f"wrote {out}")


def post_concurrently(jobs: list[tuple[str, bytes]], concurrency: int, timeout: float = 600) -> tuple[float, list, list]:
    """POST every (url, JSON body) with `concurrency` clients taking the next job as they finish one: (wall
    seconds, the httpx responses and the per-request seconds, both in job order)."""
    import httpx
    responses: list = [None] * len(jobs)
    latencies = [0.0] * len(jobs)
    next_index = iter(range(len(jobs)))
    lock = threading.Lock()

    def client():
        with httpx.Client(timeout=timeout) as http:
            while True:
                with lock:
                    i = next(next_index, None)
                if i is None:
                    return
                url, body = jobs[i]
                start = time.perf_counter()
                responses[i] = http.post(url, content=body, headers={"content-type": "application/json"})
                latencies[i] = time.perf_counter() - start

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start, responses, latencies


def _post_all(url: str, bodies: list[bytes], concurrency: int, parse: bool = True) -> tuple[float, list]:
    """POST every body with `concurrency` clients; (wall seconds, responses in body order; None unparsed)."""
    seconds, responses, _ = post_concurrently([(url, b) for b in bodies], concurrency)
    errors = [f"{r.status_code}: {r.text[:300]}" for r in responses if r.status_code != 200]
    if errors:
        raise RuntimeError(f"{len(errors)} request(s) to {url} failed, first: {errors[0]}")
    return seconds, [r.json() if parse else None for r in responses]


def bench_http(service: Service, name: str, pairs, reference: np.ndarray, latency_docs: list[str], *,
               pairs_per_request: int, requests: int, concurrency: int, latency_requests: int) -> dict:
    import httpx
    chunks = [list(range(i, i + pairs_per_request)) for i in range(0, len(pairs) - pairs_per_request + 1,
                                                                   pairs_per_request)] or [list(range(len(pairs)))]
    picks = [chunks[r % len(chunks)] for r in range(requests)]
    out = {}

    # /predict: a batch of pairs per request, raw scores, compared with (a) on the same pairs.
    predict = [json.dumps({"model": name, "raw_scores": True,
                           "inputs": [[pairs[i][0], pairs[i][1]] for i in idx]}).encode() for idx in picks]
    _post_all(service.url + "/predict", predict[:1], 1)  # warm-up
    seconds, responses = _post_all(service.url + "/predict", predict, concurrency)
    served = np.array([row[0]["score"] for row in responses[0]])
    out["c_http_predict"] = {"pairs_per_s": sum(map(len, picks)) / seconds, "seconds": seconds,
                             "requests": len(picks), "pairs_per_request": len(picks[0]),
                             "concurrency": concurrency, "vs_a": _agreement(served, reference[picks[0]])}

    # /rerank: one query and its candidate passages per request (each query's own passages, NQ-like lengths).
    rerank = [json.dumps({"model": name, "raw_scores": True, "query": pairs[idx[0]][0],
                          "texts": [pairs[i][1] for i in idx]}).encode() for idx in picks]
    _post_all(service.url + "/rerank", rerank[:1], 1)
    seconds, responses = _post_all(service.url + "/rerank", rerank, concurrency)
    out["c_http_rerank"] = {"pairs_per_s": sum(map(len, picks)) / seconds, "seconds": seconds,
                            "requests": len(picks), "pairs_per_request": len(picks[0]), "concurrency": concurrency}

    # Latency of one query x 100 documents, one request at a time.
    docs = latency_docs
    body = json.dumps({"model": name, "query": pairs[0][0], "texts": docs}).encode()
    latencies = []
    with httpx.Client(timeout=600) as http:
        for r in range(latency_requests + 1):
            start = time.perf_counter()
            resp = http.post(service.url + "/rerank", content=body, headers={"content-type": "application/json"})
            elapsed = time.perf_counter() - start
            if resp.status_code != 200 or len(resp.json()) != len(docs):
                raise RuntimeError(f"/rerank latency request failed: {resp.status_code} {resp.text[:300]}")
            if r:  # the first one warms up
                latencies.append(elapsed * 1000)
    out["latency_rerank_1x100_ms"] = {"p50": float(np.percentile(latencies, 50)),
                                      "p99": float(np.percentile(latencies, 99)), "requests": len(latencies),
                                      "documents": len(docs)}
    return out


# --- the run ------------------------------------------------------------------------------------------------

def _defaults(args) -> None:
    if args.models is None:
        args.models = ["ettin-17m"] if (args.quick or args.device == "cpu") else list(build.MODELS)
    if args.pairs is None:
        args.pairs = 48 if args.quick else 512
    if args.pairs_per_request is None:
        args.pairs_per_request = 16 if args.quick else 512
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    if args.requests is None:
        args.requests = 4 if args.quick else (8 if args.device == "cpu" else 64)
    if args.concurrency is None:
        args.concurrency = 2 if args.device == "cpu" else 8
    if args.latency_requests is None:
        args.latency_requests = 2 if args.quick else (20 if args.device == "cpu" else 100)
    if args.dtype is None:
        args.dtype = "float32" if args.device == "cpu" else "bfloat16"
    if args.max_ingress_replicas is None:
        from serve_app.resources import usable_cpus
        args.max_ingress_replicas = usable_cpus()


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--quick", action="store_true", help="CI smoke: ettin-17m, few pairs, one repeat")
    ap.add_argument("--out", help="write the figures here as JSON")
    ap.add_argument("--models", type=lambda s: s.split(","), help=f"comma-separated, from {','.join(build.MODELS)}")
    ap.add_argument("--pairs", type=int, help="pairs for (a) and (b) (default 512; --quick 48)")
    ap.add_argument("--pairs-per-request", type=int, help="pairs in one HTTP request (default 512; --quick 16)")
    ap.add_argument("--requests", type=int, help="HTTP requests per route")
    ap.add_argument("--concurrency", type=int, help="concurrent HTTP clients")
    ap.add_argument("--latency-requests", type=int, help="requests timed for the 1 x 100 latency")
    ap.add_argument("--repeats", type=int, help="timed repeats of (a) and (b) (median reported)")
    ap.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="default fp32 CPU, bf16 GPU")
    ap.add_argument("--st-batch-sizes", type=lambda s: [int(x) for x in s.split(",")], default=[32, 128, 512],
                    help="CrossEncoder.predict batch sizes to try (32 is its default); (a) is the best")
    ap.add_argument("--token-budget", type=int, help="token budget of the project's scorer (default: its own)")
    ap.add_argument("--model-cpus", type=float, help="num_cpus (and torch threads) of each model replica "
                                                     "(default: the service's default)")
    ap.add_argument("--model-replicas", type=int, help="replicas of each model (default: the service's default)")
    ap.add_argument("--capacity", action="store_true", help="serving capacity of the tokenizing tier: the "
                    "Ingress over a model that does no forward, 1..N ingress replicas (benchmarks/capacity.py)")
    ap.add_argument("--max-ingress-replicas", type=int, help="--capacity: up to this many ingress replicas "
                                                            "(default: the CPUs this process sees)")
    ap.add_argument("--workdir", help="where models are built (reused when complete); default a temp dir")
    ap.add_argument("--skip-http", action="store_true", help="measure (a) and (b) only")
    args = ap.parse_args(argv)
    _defaults(args)
    return args


def _stage(report: dict, key: str, fn):
    """Run one measurement; a failure is recorded under `key` and the run goes on."""
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - the report says what failed, the exit status says that it did
        report[key] = {"error": f"{type(exc).__name__}: {exc}"}
        report.setdefault("errors", []).append(f"{key}: {type(exc).__name__}: {exc}")
        traceback.print_exc()
        return None


def run(args) -> dict:
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="rerank-bench-"))
    pairs = make_pairs(args.pairs)
    latency_docs = [p for _, p in make_pairs(100, seed=1)]  # one query x 100 NQ-like passages
    report = {"device": args.device, "quick": args.quick, "torch": torch.__version__,
              "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
              "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
              "settings": {k: v for k, v in vars(args).items() if k not in ("out",)}, "models": {}}
    print(f"benchmark on {args.device} ({report['gpu'] or f'{torch.get_num_threads()} torch threads'}), "
          f"models in {workdir}", flush=True)

    dirs, references = {}, {}
    for name in args.models:
        entry = report["models"][name] = {}
        path = _stage(entry, "build", lambda: build.build(name, workdir))
        if path is None:
            continue
        dirs[name] = path
        if args.capacity:
            continue
        st_pairs = qwen_st_pairs(pairs) if name == QWEN else pairs
        fp32 = None
        a = _stage(entry, "a_sentence_transformers", lambda: bench_sentence_transformers(
            path, st_pairs, device=args.device, dtype=args.dtype, repeats=args.repeats,
            batch_sizes=args.st_batch_sizes))
        if a:
            entry["a_sentence_transformers"], references[name], fp32 = a
        b = _stage(entry, "b_scorer", lambda: bench_scorer(path, pairs, device=args.device, dtype=args.dtype,
                                                           repeats=args.repeats, token_budget=args.token_budget))
        if b:
            entry["b_scorer"], scores = b
            if name in references:
                entry["b_scorer"]["vs_a"] = _agreement(scores, references[name])
                if fp32 is not None:
                    entry["b_scorer"]["vs_fp32"] = _agreement(scores, fp32)
        entry["pairs"], entry["mean_pair_tokens"] = len(pairs), entry.get("b_scorer", {}).get("tokens", 0) / len(pairs)

    if args.capacity:
        from .capacity import run_capacity
        run_capacity(args, dirs, pairs, report)
        return report

    if not args.skip_http and dirs:
        service = _stage(report, "service", lambda: Service(dirs, device=args.device, dtype=args.dtype,
                                                            token_budget=args.token_budget,
                                                            model_cpus=args.model_cpus,
                                                            model_replicas=args.model_replicas))
        if service is not None:
            try:
                for name in dirs:
                    ref = references.get(name, np.full(len(pairs), np.nan))
                    c = _stage(report["models"][name], "c_http", lambda: bench_http(
                        service, name, pairs, ref, latency_docs,
                        pairs_per_request=min(args.pairs_per_request, len(pairs)),
                        requests=args.requests, concurrency=args.concurrency,
                        latency_requests=args.latency_requests))
                    if c:
                        report["models"][name].update(c)
            finally:
                service.close()

    for name, entry in report["models"].items():
        if args.capacity:
            continue
        rate = lambda key: entry.get(key, {}).get("pairs_per_s")  # noqa: E731
        a, b, cp, cr = rate("a_sentence_transformers"), rate("b_scorer"), rate("c_http_predict"), rate("c_http_rerank")
        ratio = lambda x, y: (x / y) if x and y else None  # noqa: E731
        entry["ratios"] = {"b_over_a": ratio(b, a), "c_predict_over_a": ratio(cp, a),
                           "c_rerank_over_a": ratio(cr, a), "c_predict_over_b": ratio(cp, b)}
        a32 = entry.get("a_sentence_transformers", {}).get("by_batch_size", {}).get("32")
        if a32:  # against ST at its default batch size too, as earlier runs reported
            entry["ratios"].update({"c_predict_over_a_at_32": ratio(cp, a32), "c_rerank_over_a_at_32": ratio(cr, a32)})
    return report


def print_table(report: dict) -> None:
    fmt = lambda x, spec: format("-", ">" + spec.split(".")[0]) if x is None else format(x, spec)  # noqa: E731
    print(f"\n{'model':12s} {'(a) ST':>10s} {'(b) scorer':>11s} {'(c) predict':>12s} {'(c) rerank':>11s} "
          f"{'b/a':>6s} {'c/a':>6s} {'p50 ms':>8s} {'p99 ms':>8s}   (pairs/s; latency: 1 query x 100 docs)")
    for name, e in report["models"].items():
        if "ratios" not in e:
            continue
        rate = lambda key: e.get(key, {}).get("pairs_per_s")  # noqa: E731
        lat = e.get("latency_rerank_1x100_ms", {})
        r = e.get("ratios", {})
        print(f"{name:12s} {fmt(rate('a_sentence_transformers'), '10.1f')} {fmt(rate('b_scorer'), '11.1f')} "
              f"{fmt(rate('c_http_predict'), '12.1f')} {fmt(rate('c_http_rerank'), '11.1f')} "
              f"{fmt(r.get('b_over_a'), '6.2f')} {fmt(r.get('c_predict_over_a'), '6.2f')} "
              f"{fmt(lat.get('p50'), '8.1f')} {fmt(lat.get('p99'), '8.1f')}")
        by_size = e.get("a_sentence_transformers", {}).get("by_batch_size")
        if by_size:
            print(f"{'':12s} (a) by batch size: " + ", ".join(f"{b}: {v:.1f}" for b, v in by_size.items())
                  + f"; c/a at 32: {fmt(r.get('c_predict_over_a_at_32'), '.2f')} (predict), "
                    f"{fmt(r.get('c_rerank_over_a_at_32'), '.2f')} (rerank)")
    for err in report.get("errors", []) + [f"{n}: {x}" for n, e in report["models"].items()
                                           for x in e.get("errors", [])]:
        print("ERROR", err)


def main(argv=None) -> int:
    args = parse_args(argv)
    report = run(args)
    if args.capacity:
        from .capacity import print_capacity
        print_capacity(report)
    print_table(report)
    write_report(report, args.out)
    failed = report.get("errors") or any(e.get("errors") for e in report["models"].values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
