"""One command for a GPU machine: the CUDA tests, low-precision agreement, and the benchmark harness, in one JSON.

    python -m benchmarks.gpu_check [--device cuda|cpu] [--quick] [--out FILE] [--budget-s 470]

Stages, each in its own process with its own time limit (a stage past its limit is killed and recorded as
timed out, and the run goes on):
  env        versions, the GPU, flash-attn, and what each varlen kernel resolved to (models.attention)
  tests      `pytest -q -m gpu tests/models` (skipped and recorded when pytest is not installed)
  agreement  every tiny test variant (tests/tiny_models.py) scored in float16 and bfloat16 ("auto": packed on
             CUDA) against float32 padded on the same device: max |diff| and Pearson; and float32 packed vs
             padded (the exact per-segment kernel)
  harness    benchmarks/run.py, one process per real shape (ettin-17m, ettin-150m, Qwen3-Reranker-0.6B),
             4096 NQ-like pairs on GPU; HTTP stage (c) only when Ray Serve and httpx import
The limits share --budget-s (default 470 s: the whole check fits in 8 minutes on an H100/H200); each stage gets
the remaining time in proportion to its weight, so time a stage leaves unused goes to the later ones.

Runs without flash-attn and without a package index: everything is built locally from random weights, and the
dependencies may come from an offline bundle on PYTHONPATH (the git-ignored folder `.gpu-bundle/` is meant for
one). HF_HUB_OFFLINE=1 is set for the stages when unset; TOKENIZERS_PARALLELISM is left alone.
--device cpu --quick: the same stages, small, on CPU (the CI smoke of this script; no GPU figures).
Exit status 1 when a stage failed or timed out.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GPU_PAIRS = 4096
# Relative shares of the time budget (seconds each stage may take when the budget is 470 s).
WEIGHTS = {"tests": 100, "agreement": 50, "harness:ettin-17m": 60, "harness:ettin-150m": 80,
           "harness:qwen3-0.6b": 170}
QWEN_MAX_LENGTH = 140  # as the parity tests: truncates the long documents inside the Qwen3 template


# --- the stages that run in a child process of this module -------------------------------------------------------

def env_info() -> dict:
    import torch

    from models import attention

    def version(module: str):
        if importlib.util.find_spec(module) is None:
            return None
        try:
            return getattr(__import__(module), "__version__", "installed")
        except Exception as exc:  # noqa: BLE001 - a broken install is reported, not fatal
            return f"broken: {type(exc).__name__}: {exc}"

    info = {"python": sys.version.split()[0], "platform": platform.platform(), "torch": torch.__version__,
            "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "capability": list(torch.cuda.get_device_capability()) if torch.cuda.is_available() else None,
            **{m: version(m) for m in ("flash_attn", "transformers", "sentence_transformers", "tokenizers", "ray",
                                       "httpx", "pytest")},
            "varlen_kernels": attention.kernel_report(),
            "TOKENIZERS_PARALLELISM": os.environ.get("TOKENIZERS_PARALLELISM"),
            "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE")}
    try:
        import inspect

        from torch.nn.attention.varlen import varlen_attn
        info["varlen_attn_signature"] = str(inspect.signature(varlen_attn))
    except ImportError:
        info["varlen_attn_signature"] = None
    return info


def _agreement(x, ref) -> dict:
    import numpy as np
    x, ref = np.asarray(x, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    out = {"max_abs_diff": float(np.max(np.abs(x - ref))), "finite": bool(np.isfinite(x).all())}
    if len(x) > 1 and np.std(x) > 0 and np.std(ref) > 0:
        out["pearson"] = float(np.corrcoef(x, ref)[0, 1])
    return out


def agreement(device: str, variants: list[str] | None = None) -> dict:
    """fp16 / bf16 ("auto" execution) and fp32 packed against fp32 padded, for every tiny variant (or `variants`)."""
    import torch

    from models import attention, load_scorer
    from tests.tiny_models import BUILDERS, DOCS, QUERIES

    pairs = [(q, d) for q in QUERIES for d in DOCS]
    root = Path(tempfile.mkdtemp(prefix="gpu-check-tiny-"))
    dirs = {name: BUILDERS[name](root / name) for name in (variants or BUILDERS)}
    out = {"pairs": len(pairs), "kernels": attention.kernel_report(), "variants": {}}
    for name, path in dirs.items():
        kw = {"max_length": QWEN_MAX_LENGTH} if name.startswith("qwen3") else {}
        row = out["variants"][name] = {}
        try:
            fp32 = load_scorer(str(path), dtype="float32", device=device, execution="padded", **kw)
            batch = fp32.encoder.encode(pairs)
            ref = fp32.score(batch)
            runs = [("float16", "auto"), ("bfloat16", "auto"), ("float32", "packed")]
            for dtype, execution in runs:
                key = dtype if execution == "auto" else f"{dtype}_{execution}"
                try:
                    scorer = load_scorer(str(path), dtype=dtype, device=device, execution=execution, **kw)
                    kernel = attention.varlen_backend(torch.device(device), getattr(torch, dtype)) \
                        if scorer.execution == "packed" else "sdpa (padded)"
                    row[key] = {"execution": scorer.execution, "kernel": kernel,
                                **_agreement(scorer.score(batch), ref)}
                    del scorer
                except Exception as exc:  # noqa: BLE001 - one failing dtype is a finding, not the end
                    row[key] = {"error": f"{type(exc).__name__}: {exc}"}
        except Exception as exc:  # noqa: BLE001
            row["error"] = f"{type(exc).__name__}: {exc}"
    out["failed"] = sorted(f"{n}/{k}" for n, r in out["variants"].items() for k, v in r.items()
                           if k == "error" or (isinstance(v, dict) and ("error" in v or not v.get("finite", True))))
    return out


# --- the parent: plan, limits, one JSON ----------------------------------------------------------------------------

def _child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.setdefault("HF_HUB_OFFLINE", "1")  # every model is local; never wait on an unreachable hub
    env.setdefault("RAY_AUTH_MODE", "disabled")
    env.pop("RAY_ADDRESS", None)  # the harness starts a Ray of its own
    return env


def _run(cmd: list[str], timeout_s: float, *, capture: bool = False) -> dict:
    """Run `cmd` in its own process group; kill the group past `timeout_s`. Output goes to ours (or is captured)."""
    start = time.monotonic()
    out_file = tempfile.TemporaryFile(mode="w+") if capture else None
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_child_env(), start_new_session=True,
                            stdout=out_file or sys.stdout, stderr=subprocess.STDOUT if capture else sys.stderr)
    try:
        rc = proc.wait(timeout=max(1.0, timeout_s))
        status = "ok" if rc == 0 else "failed"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the stage's own group: pytest / Ray workers it started go too
        proc.wait()
        rc, status = None, "timed_out"
    result = {"status": status, "rc": rc, "seconds": round(time.monotonic() - start, 1),
              "limit_s": round(timeout_s, 1)}
    if capture:
        out_file.seek(0)
        result["output"] = out_file.read()
        out_file.close()
    return result


def _finish(r: dict) -> dict:
    """Echo a stage's captured output; keep its tail in the JSON when the stage did not succeed."""
    output = r.pop("output")
    print(output[-8000:], flush=True)
    if r["status"] != "ok":
        r["output_tail"] = output[-6000:]
    return r


def _pytest_counts(text: str) -> dict:
    tail = "\n".join(text.strip().splitlines()[-3:])
    return {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected|xfailed|xpassed)",
                                                   tail)}


def stage_tests(args, limit: float) -> dict:
    if importlib.util.find_spec("pytest") is None:
        return {"status": "skipped", "reason": "pytest is not installed here"}
    r = _run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", *args.tests], limit,
             capture=True)
    output = r.pop("output")
    print(output[-4000:], flush=True)
    r["counts"] = _pytest_counts(output)
    if r["rc"] == 5:  # no test selected: nothing ran, nothing failed
        r["status"] = "ok"
    if r["status"] != "ok":
        r["output_tail"] = output[-6000:]
    return r


def stage_in_child(name: str, args, limit: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        result_file = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "benchmarks.gpu_check", "--device", args.device, "--stage", name,
               "--result", str(result_file)]
        if args.variants:
            cmd += ["--variants", ",".join(args.variants)]
        r = _finish(_run(cmd, limit, capture=True))
        if result_file.exists():
            r["result"] = json.loads(result_file.read_text())
    if r["status"] == "ok" and r.get("result", {}).get("failed"):
        r["status"] = "failed"
    return r


def stage_harness(model: str, args, limit: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "harness.json"
        cmd = [sys.executable, "-m", "benchmarks.run", "--device", args.device, "--models", model,
               "--workdir", args.workdir, "--out", str(out)]
        if args.quick:
            cmd += ["--quick"]
        else:
            cmd += ["--pairs", str(args.pairs), "--repeats", "1", "--requests", "16", "--latency-requests", "20"]
        http = all(importlib.util.find_spec(m) is not None for m in ("ray", "httpx", "fastapi"))
        if args.skip_http or not http:
            cmd += ["--skip-http"]
        r = _finish(_run(cmd, limit, capture=True))
        r["http"] = not (args.skip_http or not http)
        if out.exists():
            r["report"] = json.loads(out.read_text())
    return r


def plan(args) -> list[str]:
    stages = ["tests", "agreement"]
    models = ["ettin-17m"] if args.quick else ["ettin-17m", "ettin-150m", "qwen3-0.6b"]
    return stages + [f"harness:{m}" for m in models]


def run(args) -> dict:
    started = time.monotonic()
    deadline = started + args.budget_s
    report = {"command": " ".join(["python -m benchmarks.gpu_check"] + (args.argv or [])), "device": args.device,
              "quick": args.quick, "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "budget_s": args.budget_s, "stages": {}}
    report["env"] = _run_env(args)
    todo = plan(args)
    for i, name in enumerate(todo):
        remaining = deadline - time.monotonic()
        share = WEIGHTS[name] / sum(WEIGHTS[n] for n in todo[i:])
        limit = remaining * share
        print(f"\n=== {name} (limit {limit:.0f} s) ===", flush=True)
        if limit < 5:
            report["stages"][name] = {"status": "skipped", "reason": "the time budget is spent"}
            continue
        if name == "tests":
            result = stage_tests(args, limit)
        elif name == "agreement":
            result = stage_in_child("agreement", args, limit)
        else:
            result = stage_harness(name.split(":", 1)[1], args, limit)
        report["stages"][name] = result
        print(f"=== {name}: {result['status']} in {result.get('seconds', 0)} s ===", flush=True)
    report["seconds"] = round(time.monotonic() - started, 1)
    report["failed"] = [n for n, s in report["stages"].items() if s["status"] in ("failed", "timed_out")]
    return report


def _run_env(args) -> dict:
    r = stage_in_child("env", args, 120)
    return r.get("result") or {"error": r}


def print_summary(report: dict) -> None:
    env = report["env"]
    print(f"\ngpu_check on {report['device']}: {env.get('gpu') or 'no GPU'}, torch {env.get('torch')} "
          f"(CUDA {env.get('torch_cuda')}), flash-attn {env.get('flash_attn') or 'absent'}, "
          f"{report['seconds']} s of {report['budget_s']} s")
    print(f"varlen kernels: {env.get('varlen_kernels')}")
    print(f"\n{'stage':22s} {'status':10s} {'seconds':>8s}  detail")
    for name, s in report["stages"].items():
        detail = s.get("reason", "")
        if name == "tests":
            detail = " ".join(f"{n} {w}" for w, n in s.get("counts", {}).items())
        print(f"{name:22s} {s['status']:10s} {s.get('seconds', 0):8.1f}  {detail}")
    variants = report["stages"].get("agreement", {}).get("result", {}).get("variants", {})
    if variants:
        print(f"\n{'variant':24s} {'dtype':16s} {'execution':9s} {'kernel':14s} {'max|diff|':>10s} {'pearson':>9s}"
              "   (vs float32 padded, same device)")
        for name, row in variants.items():
            for key, v in row.items():
                if not isinstance(v, dict):
                    print(f"{name:24s} {key:16s} {v}")
                elif "error" in v:
                    print(f"{name:24s} {key:16s} ERROR {v['error'][:100]}")
                else:
                    p = v.get("pearson")
                    print(f"{name:24s} {key:16s} {v['execution']:9s} {v['kernel']:14s} {v['max_abs_diff']:10.2e} "
                          f"{'-' if p is None else format(p, '9.6f'):>9s}")
    harness = {n: s["report"] for n, s in report["stages"].items() if n.startswith("harness:") and "report" in s}
    if harness:
        from .run import print_table
        merged = {"models": {}, "errors": []}
        for sub in harness.values():
            merged["models"].update(sub["models"])
            merged["errors"] += sub.get("errors", [])
        print_table(merged)
    for name in report["failed"]:
        print(f"FAILED stage {name}")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--quick", action="store_true", help="small stages (ettin-17m only, the harness's --quick)")
    ap.add_argument("--out", help="the JSON (default benchmarks/results/gpu_check_<device>.json)")
    ap.add_argument("--budget-s", type=float, default=470.0, help="time for all stages together (default 470)")
    ap.add_argument("--pairs", type=int, default=GPU_PAIRS, help=f"harness pairs per model (default {GPU_PAIRS})")
    ap.add_argument("--tests", nargs="+", default=["tests/models"], help="what the tests stage runs (-m gpu)")
    ap.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "rerank-gpu-check-models"),
                    help="where the harness builds its models (reused when complete)")
    ap.add_argument("--skip-http", action="store_true", help="harness without the HTTP service stage (c)")
    ap.add_argument("--variants", type=lambda s: s.split(","), help="tiny variants of the agreement stage "
                                                                     "(default: all of tests/tiny_models.py)")
    ap.add_argument("--stage", help=argparse.SUPPRESS)  # internal: run one stage in this process
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.stage:  # a child: one stage, its result as JSON
        result = env_info() if args.stage == "env" else agreement(args.device, args.variants)
        Path(args.result).write_text(json.dumps(result, indent=2, default=str))
        return 0
    if args.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            print("--device cuda: no CUDA device here (use --device cpu --quick for the CPU smoke)", file=sys.stderr)
            return 2
    report = run(args)
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"gpu_check_{args.device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str))
    print_summary(report)
    print(f"wrote {out}")
    return 1 if report["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
