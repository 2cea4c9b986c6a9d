"""Many models on one machine: the service's DEFAULT layout next to hand layouts, under one mixed load, in one run.

    python -m benchmarks.multi_model [--quick] [--out results.json] [--rounds N] [--layouts defaults,one-thread]
                                     [--requests 300] [--concurrency 16] [--workdir DIR]

Eight small models in the real layouts (benchmarks/workload.py TINY_MODELS: three modular cross-encoders, three
sequence classifiers, two Qwen3-Rerankers), served together by `serve_app.build_app`. Clients send a fixed,
seeded mix of requests: each picks a model, a route (/rerank, /predict, /v1/rerank, /v2/rerank) and a size
(1-64 NQ-like documents) at random; `--concurrency` clients send them all. Each layout deploys the same models
on a fresh local Ray instance and answers the same requests: requests/s, pairs/s, latency p50 / p99, and what
/info says each replica ran. With `--rounds N` the layouts alternate N times and the medians are reported.

Layouts (`--layouts`):
  defaults       no layout settings: each CPU replica's threads are its share of the node (serve_app/cpu_share.py)
  one-thread     every model `num_cpus: 0.5`, i.e. one torch thread each (the hand layout of the issue)
  two-threads    every model `num_cpus: 2`
  defaults-passive, one-thread-passive   the same with OMP_WAIT_POLICY=PASSIVE in every Ray worker (OpenMP
                 threads sleep at once after a parallel region instead of spinning)
Ray gets enough LOGICAL CPUs for each layout's reservations (eight models at 0.5 do not fit two cores): logical
CPUs only place replicas; the threads that run are what the layout and the node share decide.
`--overhead` adds the in-process cost of one uncontended CpuShare.forward() (the per-forward price of sharing).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from . import build
from .run import _free_port, make_pairs, post_concurrently, write_report
from .workload import TINY_MODELS

ROUTES = ("/rerank", "/predict", "/v1/rerank", "/v2/rerank")
SIZES = (1, 2, 4, 8, 16, 32, 64)
SIZE_WEIGHTS = (0.12, 0.14, 0.18, 0.2, 0.16, 0.12, 0.08)
QUICK_MODELS = ("modular-1", "seq-cls-bert-1", "qwen3-1")
PASSIVE = {"OMP_WAIT_POLICY": "PASSIVE"}
LAYOUTS = {
    "defaults": ({}, {}),
    "one-thread": ({"num_cpus": 0.5}, {}),
    "two-threads": ({"num_cpus": 2}, {}),
    "defaults-passive": ({}, PASSIVE),
    "one-thread-passive": ({"num_cpus": 0.5}, PASSIVE),
}


# --- the workload ------------------------------------------------------------------------------------------------

def make_requests(models: list[str], n: int, seed: int = 0) -> list[dict]:
    """n requests: (model, route, documents) drawn at random, with NQ-like query and passage lengths."""
    rng = np.random.default_rng(seed)
    pool = make_pairs(2048, seed=seed + 3)
    out = []
    for _ in range(n):
        model, route = models[rng.integers(len(models))], ROUTES[rng.integers(len(ROUTES))]
        size = int(rng.choice(SIZES, p=SIZE_WEIGHTS))
        start = int(rng.integers(0, len(pool) - size))
        query = pool[start][0]
        docs = [d for _, d in pool[start:start + size]]
        if route == "/rerank":
            body = {"model": model, "query": query, "texts": docs, "raw_scores": True}
        elif route == "/predict":
            body = {"model": model, "inputs": [[query, d] for d in docs], "raw_scores": True}
        else:
            body = {"model": model, "query": query, "documents": docs}
        out.append({"model": model, "route": route, "pairs": size, "body": json.dumps(body).encode()})
    return out


def send_all(url: str, requests: list[dict], concurrency: int) -> dict:
    """Every request, `concurrency` clients at once: wall time, per-request latencies, failures."""
    wall, responses, latencies = post_concurrently([(url + r["route"], r["body"]) for r in requests], concurrency,
                                                   timeout=300)
    failures = [f"{req['route']} {req['model']}: {r.status_code} {r.text[:200]}"
                for req, r in zip(requests, responses) if r.status_code != 200]
    ms = np.array(latencies) * 1000
    pairs = sum(r["pairs"] for r in requests)
    return {"requests": len(requests), "pairs": pairs, "seconds": wall, "requests_per_s": len(requests) / wall,
            "pairs_per_s": pairs / wall, "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "failures": len(failures), "first_failure": failures[0] if failures else None}


# --- one layout on a fresh Ray -------------------------------------------------------------------------------

def reserved_cpus(specs: list[dict]) -> float:
    from serve_app import AppSettings
    from serve_app.builder import deployment_options, ingress_options

    settings = AppSettings.model_validate({"models": specs, "api_key": None})
    return sum(deployment_options(m)["ray_actor_options"]["num_cpus"] for m in settings.models) + \
        ingress_options(settings)["ray_actor_options"]["num_cpus"]


def run_layout(name: str, dirs: dict[str, Path], requests: list[dict], concurrency: int) -> dict:
    import httpx
    import ray
    from ray import serve

    from serve_app import build_app

    overrides, env = LAYOUTS[name]
    specs = [{"name": m, "model_id": str(p), **overrides} for m, p in dirs.items()]
    logical = max(os.cpu_count() or 1, math.ceil(reserved_cpus(specs))) + 1
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # Ray's workers inherit the environment of the cluster this process starts
    try:
        ray.init(address="local", num_cpus=logical, include_dashboard=False, logging_level="ERROR",
                 log_to_driver=False)
        port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        url = f"http://127.0.0.1:{port}"
        start = time.perf_counter()
        serve.run(build_app({"models": specs, "api_key": None}), name="multi", route_prefix="/")
        deploy_s = time.perf_counter() - start
        with httpx.Client(timeout=300) as http:  # warm-up: one small request per model and route
            for m in dirs:
                for route in ROUTES:
                    warm = next(r for r in make_requests([m], 64, seed=7) if r["route"] == route)
                    r = http.post(url + route, content=warm["body"], headers={"content-type": "application/json"})
                    r.raise_for_status()
        figures = send_all(url, requests, concurrency)
        time.sleep(1.2)  # past /info's cache: the threads of each replica's last forwards
        info = httpx.get(url + "/info", timeout=60).json()
        figures["replicas"] = {m["name"]: {k: m["serving"].get(k) for k in ("torch_threads", "torch_threads_from",
                                                                          "cpus_seen")}
                               for m in info["models"]}
        figures.update(layout=name, logical_cpus=logical, deploy_s=deploy_s, env=env, model_settings=overrides)
        return figures
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def slot_overhead_us(forwards: int = 20000) -> dict:
    """Microseconds one uncontended CpuShare.forward() costs (enter + exit), and torch.set_num_threads."""
    import torch

    from serve_app.cpu_share import CpuShare

    with tempfile.TemporaryDirectory() as root:
        share = CpuShare("overhead", cpus=2, model="m", root=Path(root))
        try:
            start = time.perf_counter()
            for _ in range(forwards):
                with share.forward():
                    pass
            per = (time.perf_counter() - start) / forwards * 1e6
        finally:
            share.close()
    threads = torch.get_num_threads()
    start = time.perf_counter()
    for i in range(forwards):
        torch.set_num_threads(1 + i % 2)
    torch.set_num_threads(threads)
    return {"cpu_share_forward_us": per, "set_num_threads_us": (time.perf_counter() - start) / forwards * 1e6}


# --- the run -----------------------------------------------------------------------------------------------------

def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.multi_model", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="CI smoke: 3 models, 24 requests, 4 clients")
    ap.add_argument("--out", help="write the figures here as JSON")
    ap.add_argument("--layouts", type=lambda s: s.split(","), default=None,
                    help=f"comma-separated, from {','.join(LAYOUTS)} (default: defaults,one-thread)")
    ap.add_argument("--models", type=lambda s: s.split(","), help=f"from {','.join(TINY_MODELS)}")
    ap.add_argument("--requests", type=int, help="requests per layout and round (default 300; --quick 24)")
    ap.add_argument("--concurrency", type=int, help="concurrent clients (default 16; --quick 4)")
    ap.add_argument("--rounds", type=int, default=1, help="alternate the layouts this many times (medians)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--overhead", action="store_true", help="also time one uncontended CpuShare.forward()")
    ap.add_argument("--workdir", help="where the models are built (reused when complete); default a temp dir")
    args = ap.parse_args(argv)
    args.layouts = args.layouts or ["defaults", "one-thread"]
    unknown = [x for x in args.layouts if x not in LAYOUTS]
    if unknown:
        ap.error(f"unknown layouts {unknown}; choose from {list(LAYOUTS)}")
    args.models = args.models or list(QUICK_MODELS if args.quick else TINY_MODELS)
    args.requests = args.requests or (24 if args.quick else 300)
    args.concurrency = args.concurrency or (4 if args.quick else 16)
    return args


def _median(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def run(args) -> dict:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import torch

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="rerank-multi-"))
    dirs = {m: build.build(m, workdir) for m in args.models}
    requests = make_requests(args.models, args.requests, seed=args.seed)
    from serve_app.resources import usable_cpus
    report = {"benchmark": "multi_model", "quick": args.quick, "cpus": usable_cpus(), "torch": torch.__version__,
              "platform": platform.platform(), "settings": {k: v for k, v in vars(args).items() if k != "out"},
              "workload": {"requests": len(requests), "pairs": sum(r["pairs"] for r in requests),
                           "by_route": {r: sum(q["route"] == r for q in requests) for r in ROUTES},
                           "models": {m: TINY_MODELS[m][0] for m in args.models}},
              "rounds": [], "layouts": {}, "errors": []}
    if args.overhead:
        report["overhead"] = slot_overhead_us()
    for round_ in range(args.rounds):
        order = args.layouts if round_ % 2 == 0 else list(reversed(args.layouts))
        for name in order:
            print(f"round {round_ + 1}: {name} ...", flush=True)
            try:
                figures = run_layout(name, dirs, requests, args.concurrency)
            except Exception as exc:  # noqa: BLE001 - recorded; the exit status says a layout failed
                report["errors"].append(f"{name}: {type(exc).__name__}: {exc}")
                print("ERROR", report["errors"][-1], flush=True)
                continue
            figures["round"] = round_ + 1
            report["rounds"].append(figures)
            if figures["failures"]:
                report["errors"].append(f"{name}: {figures['failures']} failed requests, first: "
                                        f"{figures['first_failure']}")
            print(f"  {figures['requests_per_s']:.1f} req/s, {figures['pairs_per_s']:.0f} pairs/s, "
                  f"p50 {figures['p50_ms']:.0f} ms, p99 {figures['p99_ms']:.0f} ms", flush=True)
    for name in args.layouts:
        runs = [r for r in report["rounds"] if r["layout"] == name]
        if runs:
            report["layouts"][name] = {k: _median(runs, k) for k in
                                       ("requests_per_s", "pairs_per_s", "p50_ms", "p99_ms")}
            report["layouts"][name]["rounds"] = len(runs)
    hand = {k: v for k, v in report["layouts"].items() if not k.startswith("defaults")}
    if "defaults" in report["layouts"] and hand:
        best = max(hand, key=lambda k: hand[k]["requests_per_s"])
        d = report["layouts"]["defaults"]
        report["defaults_vs_best_hand"] = {"best_hand_layout": best,
                                           "requests_per_s": d["requests_per_s"] / hand[best]["requests_per_s"],
                                           "p99": d["p99_ms"] / hand[best]["p99_ms"]}
    return report


def print_table(report: dict) -> None:
    print(f"\n{'layout':22s} {'req/s':>8s} {'pairs/s':>9s} {'p50 ms':>8s} {'p99 ms':>8s} {'rounds':>7s}")
    for name, f in report["layouts"].items():
        print(f"{name:22s} {f['requests_per_s']:8.1f} {f['pairs_per_s']:9.0f} {f['p50_ms']:8.0f} "
              f"{f['p99_ms']:8.0f} {f['rounds']:7d}")
    ratio = report.get("defaults_vs_best_hand")
    if ratio:
        print(f"defaults / best hand layout ({ratio['best_hand_layout']}): requests/s {ratio['requests_per_s']:.2f}x, "
              f"p99 {ratio['p99']:.2f}x")
    if "overhead" in report:
        o = report["overhead"]
        print(f"one uncontended CpuShare.forward(): {o['cpu_share_forward_us']:.1f} us; torch.set_num_threads: "
              f"{o['set_num_threads_us']:.2f} us")
    for err in report["errors"]:
        print("ERROR", err)


def main(argv=None) -> int:
    args = parse_args(argv)
    report = run(args)
    print_table(report)
    write_report(report, args.out)
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
