"""Serving capacity of the tokenizing tier, with the model out of the way (`python -m benchmarks.run --capacity`).

The service's own Ingress (HTTP, validation, tokenization, fan-out, handle calls, response) runs unchanged in
front of a benchmark-only model deployment that does no forward: `NullModel` returns zeros. It lives only here,
so no setting of the service can reach it. For 1..N ingress replicas it reports HTTP pairs/s, the CPU seconds the
ingress replicas and Ray's HTTP proxy spent (from /proc), pairs per ingress CPU-second, and the scaling; next to
the raw `Encoder.encode` rate on the same pairs with one core (a child process pinned to one CPU), compared
CPU-second to CPU-second so that other processes on the machine change neither side.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

APP = "capacity"


def _proc_cpu_seconds(prefix: str) -> float:
    """utime + stime of every process whose title starts with `prefix` (Ray names actor processes
    `ray::<class>`; a Serve replica `ray::ServeReplica:<app>:<deployment>`)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            if not title.startswith(prefix):
                continue
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15 of proc(5))
        except (OSError, IndexError, ValueError):
            continue
    return total / tick


def encode_rate_one_core(model_dir: Path, pairs, repeats: int) -> dict:
    """`Encoder.encode` pairs/s of one core: measured in a child pinned to one CPU before the tokenizer loads
    (so its Rust thread pool has one core to run on, whatever its thread count)."""
    code = ("import json,os,sys,time,statistics; os.sched_setaffinity(0,{min(os.sched_getaffinity(0))}); "
            "import models; d=json.load(sys.stdin); pairs=[tuple(p) for p in d['pairs']]; "
            "enc=models.load_encoder(d['dir']); enc.encode(pairs); s=[]; c=[]\n"
            "for _ in range(d['repeats']):\n"
            " t=time.perf_counter(); u=time.process_time(); b=enc.encode(pairs)\n"
            " s.append(time.perf_counter()-t); c.append(time.process_time()-u)\n"
            "q=[(pairs[0][0], p[1]) for p in pairs]; u=time.process_time(); enc.encode(q); r=time.process_time()-u\n"
            "print(json.dumps({'pairs_per_s': len(pairs)/statistics.median(s), 'seconds': s, 'cpu_seconds': c,"
            " 'pairs_per_cpu_s': len(pairs)/statistics.median(c), 'tokens': int(b.num_tokens),"
            " 'one_query_pairs_per_cpu_s': len(q)/r}))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                         os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", code], input=json.dumps(
        {"dir": str(model_dir), "pairs": pairs, "repeats": repeats}), capture_output=True, text=True, env=env,
        timeout=600)
    if proc.returncode:
        raise RuntimeError(f"encode-rate child failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def null_model_deployment():
    """The benchmark-only model deployment: same `score`/`describe` interface, zero cost, zero scores."""
    from ray import serve

    @serve.deployment(name="null-model", ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=1024)
    class NullModel:
        async def score(self, batch):
            return np.zeros(len(batch), dtype=np.float32)

        def describe(self):
            return {"family": "null", "dtype": "none", "device": "none", "token_budget": None}

    return NullModel


def deploy(model_dirs: dict[str, Path], ingress_replicas: int, url: str, timeout_s: float = 300) -> None:
    """The service's Ingress over NullModel handles, `ingress_replicas` replicas, as app APP at '/'."""
    import httpx
    from ray import serve

    from deployments.ingress import Ingress
    from serve_app.builder import ingress_options
    from serve_app.settings import AppSettings

    settings = AppSettings.model_validate({
        "models": [{"name": n, "model_id": str(p)} for n, p in model_dirs.items()], "api_key": None,
        "ingress": {"num_replicas": ingress_replicas}})
    null = null_model_deployment()
    handles = {n: null.options(name=f"null-{i}").bind() for i, n in enumerate(model_dirs)}
    serve.run(Ingress.options(**ingress_options(settings)).bind(settings, handles), name=APP, route_prefix="/",
              blocking=False)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError("the capacity app did not become healthy")


def measure(url: str, name: str, pairs, *, route: str, pairs_per_request: int, requests: int,
            concurrency: int) -> dict:
    from .run import _post_all

    chunks = [pairs[i:i + pairs_per_request] for i in range(0, len(pairs) - pairs_per_request + 1,
                                                            pairs_per_request)] or [pairs]
    picks = [chunks[r % len(chunks)] for r in range(requests)]
    if route == "/predict":
        bodies = [json.dumps({"model": name, "raw_scores": True, "inputs": [[q, d] for q, d in c]}).encode()
                  for c in picks]
    else:
        bodies = [json.dumps({"model": name, "raw_scores": True, "query": c[0][0], "texts": [d for _, d in c]})
                  .encode() for c in picks]
    _post_all(url + route, bodies[:concurrency], concurrency)  # warm-up
    ingress0, proxy0 = _proc_cpu_seconds(f"ray::ServeReplica:{APP}:ingress"), _proc_cpu_seconds("ray::ProxyActor")
    seconds, _ = _post_all(url + route, bodies, concurrency, parse=False)
    ingress_cpu = _proc_cpu_seconds(f"ray::ServeReplica:{APP}:ingress") - ingress0
    proxy_cpu = _proc_cpu_seconds("ray::ProxyActor") - proxy0
    n = sum(map(len, picks))
    return {"pairs_per_s": n / seconds, "seconds": seconds, "requests": len(picks), "pairs_per_request":
            len(picks[0]), "concurrency": concurrency, "ingress_cpu_s": ingress_cpu, "proxy_cpu_s": proxy_cpu,
            "pairs_per_ingress_cpu_s": n / ingress_cpu if ingress_cpu > 0 else None,
            "pairs_per_serving_cpu_s": n / (ingress_cpu + proxy_cpu) if ingress_cpu + proxy_cpu > 0 else None}


def run_capacity(args, dirs: dict[str, Path], pairs, report: dict) -> None:
    """Fill report["models"][name]["capacity"] for 1..args.max_ingress_replicas ingress replicas."""
    from .run import Service, _stage

    counts = list(range(1, args.max_ingress_replicas + 1))
    for name, path in dirs.items():
        entry = report["models"][name].setdefault("capacity", {})
        enc = _stage(entry, "encode_one_core", lambda: encode_rate_one_core(path, pairs, args.repeats))
        if enc:
            entry["encode_one_core"] = enc
    service = _stage(report, "service", lambda: Service({}, device="cpu", dtype="float32", token_budget=None,
                                                        model_cpus=None, model_replicas=None, start_app=False))
    if service is None:
        return
    try:
        for n in counts:
            ok = _stage(report, f"capacity_deploy_{n}", lambda: deploy(dirs, n, service.url))
            if ok is None and f"capacity_deploy_{n}" in report:
                break
            for name in dirs:
                entry = report["models"][name]["capacity"]
                for route in ("/predict", "/rerank"):
                    m = _stage(entry, f"{route[1:]}_{n}", lambda: measure(
                        service.url, name, pairs, route=route, pairs_per_request=min(args.pairs_per_request,
                                                                                       len(pairs)),
                        requests=args.requests * n, concurrency=args.concurrency * n))
                    if m:
                        entry.setdefault(route[1:], {})[str(n)] = m
    finally:
        service.close()
    for name in dirs:
        entry = report["models"][name]["capacity"]
        # CPU seconds against CPU seconds: both sides immune to other processes taking the cores.
        one_core = entry.get("encode_one_core", {}).get("pairs_per_cpu_s")
        for route in ("predict", "rerank"):
            runs = entry.get(route, {})
            if "1" in runs:
                base = runs["1"]["pairs_per_s"]
                for n, m in runs.items():
                    m["scaling_vs_1"] = m["pairs_per_s"] / base
                    if one_core and m["pairs_per_ingress_cpu_s"]:
                        m["per_ingress_cpu_over_encode_one_core"] = m["pairs_per_ingress_cpu_s"] / one_core


def print_capacity(report: dict) -> None:
    fmt = lambda x, spec: "-" if x is None else format(x, spec)  # noqa: E731
    for name, e in report["models"].items():
        cap = e.get("capacity")
        if not cap:
            continue
        enc = cap.get("encode_one_core", {})
        print(f"\n{name}: Encoder.encode on one core {fmt(enc.get('pairs_per_cpu_s'), '.0f')} pairs per CPU-second, "
              f"{fmt(enc.get('pairs_per_s'), '.0f')} pairs/s (one query x many docs: "
              f"{fmt(enc.get('one_query_pairs_per_cpu_s'), '.0f')} per CPU-second)")
        print(f"{'route':9s} {'ingress':>7s} {'pairs/s':>9s} {'scaling':>8s} {'ingress cpu-s':>13s} "
              f"{'proxy cpu-s':>11s} {'pairs/ingress cpu-s':>19s} {'/ encode 1 core':>15s}")
        for route in ("predict", "rerank"):
            for n, m in cap.get(route, {}).items():
                print(f"{route:9s} {n:>7s} {m['pairs_per_s']:9.0f} {fmt(m.get('scaling_vs_1'), '8.2f')} "
                      f"{m['ingress_cpu_s']:13.2f} {m['proxy_cpu_s']:11.2f} "
                      f"{fmt(m.get('pairs_per_ingress_cpu_s'), '19.0f')} "
                      f"{fmt(m.get('per_ingress_cpu_over_encode_one_core'), '15.2f')}")
