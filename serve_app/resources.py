"""How many CPUs a process can really use, and the CPU sizing the defaults derive from it.

Sizing happens in two places, on purpose:
- a model replica sizes its torch threads at RUNTIME from the CPUs it sees (affinity and cgroup quota), shared
  with the other CPU replicas of its node per forward (serve_app/cpu_share.py), since only the replicas know
  the machine they landed on and who else is busy there; Ray's logical `num_cpus` stays a small fractional
  reservation so several models still fit a small machine;
- the builder sizes the number of ingress (tokenizing) replicas at BUILD time when a model is on a GPU, from the
  CPUs of the GPU node (the cluster's when Ray is up, else this machine's).
An explicit setting (`num_cpus` of a model, `ingress.num_replicas`) always wins; /info reports what was chosen.
No Ray import at module level: unit-testable without a cluster.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

# Tokenizing replicas per node CPU when a model is on a GPU: every ingress replica runs the GIL-bound HTTP work
# (JSON, validation, response) on one core while the Rust tokenizer runs on its own threads.
GPU_INGRESS_CPUS_PER_REPLICA = 2
MAX_GPU_INGRESS_REPLICAS = 16


def cgroup_cpu_limit(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """The cgroup CPU quota in CPUs (v2 `cpu.max`, else v1 `cpu.cfs_quota_us`), None when unlimited or unknown."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def usable_cpus(affinity: set[int] | None = None, limit: float | None | object = ...) -> int:
    """Whole CPUs this process can run on: its affinity mask, capped by the cgroup quota (rounded up), >= 1."""
    if affinity is None:
        try:
            affinity = os.sched_getaffinity(0)
        except (AttributeError, OSError):  # not on Linux
            affinity = set(range(os.cpu_count() or 1))
    cpus = max(1, len(affinity))
    limit = cgroup_cpu_limit() if limit is ... else limit
    if limit is not None:
        cpus = min(cpus, max(1, math.ceil(limit)))
    return cpus


def model_torch_threads(num_cpus: float | None, device: str, visible: int) -> tuple[int | None, str]:
    """(torch threads of a model replica, why). An explicit `num_cpus` gives floor(num_cpus) threads (>= 1);
    unset on CPU, a share of the node (serve_app/cpu_share.py), at most every CPU the replica sees: one model
    alone gets the whole machine, busy neighbours split it. On CUDA: torch's own setting (the forward runs on
    the GPU; None leaves it)."""
    if num_cpus is not None:
        return max(1, math.floor(num_cpus)), "num_cpus"
    if device == "cpu":
        return max(1, visible), "node share"
    return None, "default"


def gpu_ingress_replicas(node_cpus: int) -> int:
    """Ingress replicas for a GPU node of `node_cpus` CPUs: one per GPU_INGRESS_CPUS_PER_REPLICA CPUs."""
    return max(1, min(MAX_GPU_INGRESS_REPLICAS, node_cpus // GPU_INGRESS_CPUS_PER_REPLICA))


def gpu_node_cpus() -> int:
    """CPUs of the biggest GPU node of the running Ray cluster; this machine's when Ray is not up (a `serve run`
    of an import path builds the app before it starts Ray) or no node has a GPU yet."""
    try:
        import ray
        if ray.is_initialized():
            cpus = [int(n["Resources"].get("CPU", 0)) for n in ray.nodes()
                    if n.get("Alive") and n["Resources"].get("GPU", 0) > 0]
            if cpus and max(cpus) > 0:
                return max(cpus)
    except Exception:  # noqa: BLE001 - sizing must never fail the build
        pass
    return usable_cpus()
