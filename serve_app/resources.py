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
import re
from dataclasses import dataclass
from pathlib import Path

# Tokenizing replicas per node CPU when a model is on a GPU: every ingress replica runs the GIL-bound HTTP work
# (JSON, validation, response) on one core while the Rust tokenizer runs on its own threads.
GPU_INGRESS_CPUS_PER_REPLICA = 2
MAX_GPU_INGRESS_REPLICAS = 16


@dataclass(frozen=True)
class CgroupMount:
    """Where a cgroup hierarchy is mounted: `root` is the cgroup path the mount shows at `point` (mountinfo's
    root field: "/" in a cgroup namespace, the container's own cgroup under an older Docker's bind mount)."""

    version: int  # 1 or 2
    root: str
    point: str


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash in paths as octal escapes (\\040, ...)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def cgroup_mounts(mountinfo: str) -> dict[int, CgroupMount]:
    """The cgroup v2 (unified) mount and the v1 mount that carries the `cpu` controller, from /proc/self/mountinfo
    (`ID parent major:minor root point options [optional...] - fstype source super-options`)."""
    found: dict[int, CgroupMount] = {}
    for line in mountinfo.splitlines():
        head, sep, tail = line.partition(" - ")
        fields, rest = head.split(), tail.split()
        if not sep or len(fields) < 5 or len(rest) < 3:
            continue
        fstype, options = rest[0], rest[2].split(",")
        version = 2 if fstype == "cgroup2" else 1 if fstype == "cgroup" and "cpu" in options else None
        if version is not None and version not in found:
            found[version] = CgroupMount(version, _unescape(fields[3]), _unescape(fields[4]))
    return found


def own_cgroups(proc_cgroup: str) -> dict[int, str]:
    """This process's cgroup path per version, from /proc/self/cgroup: v1 from the line whose controllers include
    `cpu` ("4:cpu,cpuacct:/path"), v2 from the unified line ("0::/path")."""
    own: dict[int, str] = {}
    for line in proc_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":
            own.setdefault(2, path)
        elif "cpu" in controllers.split(","):
            own.setdefault(1, path)
    return own


def _quota(directory: Path, version: int) -> float | None:
    """The CPU quota set on one cgroup directory, in CPUs; None when it sets none ("max", -1) or cannot be read."""
    try:
        if version == 2:
            quota, period = (directory / "cpu.max").read_text().split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        quota = int((directory / "cpu.cfs_quota_us").read_text())
        period = int((directory / "cpu.cfs_period_us").read_text())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError, ZeroDivisionError):
        return None


def _cgroup_dirs(mount: CgroupMount, path: str, fs_root: Path) -> list[Path]:
    """The process's cgroup directory under `mount`, then each ancestor up to the mount point: the nested
    cgroups whose quotas all apply (the kernel throttles at every level; the smallest binds)."""
    point = fs_root / mount.point.lstrip("/")
    root = mount.root.rstrip("/")
    if path == root or path.startswith(root + "/"):
        relative = [p for p in path[len(root):].split("/") if p]
    else:  # a path outside what the mount shows (e.g. another cgroup namespace): the mount's own level
        relative = []
    dirs = [point]
    for part in relative:
        dirs.append(dirs[-1] / part)
    return dirs[::-1]


def cgroup_cpu_limit(proc_self: Path = Path("/proc/self"), fs_root: Path = Path("/")) -> float | None:
    """The CPU quota the kernel applies to this process, in CPUs: the smallest quota over its own cgroup (read
    from `proc_self`/cgroup, v1's `cpu` controller where it has one, else v2's unified path) and every ancestor
    cgroup visible under its mount (`proc_self`/mountinfo); None when no level sets one or nothing can be read.
    `fs_root` prefixes the mount points (tests build fake trees)."""
    try:
        own = own_cgroups((proc_self / "cgroup").read_text())
    except OSError:
        return None
    try:
        mounts = cgroup_mounts((proc_self / "mountinfo").read_text())
    except OSError:  # the usual mount points
        mounts = {1: CgroupMount(1, "/", "/sys/fs/cgroup/cpu"), 2: CgroupMount(2, "/", "/sys/fs/cgroup")}
    for version in (1, 2):  # a hybrid host keeps the cpu controller on v1
        if version in own and version in mounts:
            quotas = [q for d in _cgroup_dirs(mounts[version], own[version], fs_root)
                      if (q := _quota(d, version)) is not None]
            return min(quotas) if quotas else None
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
