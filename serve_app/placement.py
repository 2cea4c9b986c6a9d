"""Will Ray be able to place the application? Checked at build time against a cluster that cannot grow.

Ray never fails a replica it cannot place: it stays pending for ever (a third 0.5-GPU model on one GPU, eight
0.5-CPU models on two logical CPUs, 1.5 GPUs, an accelerator type no node has). So `build_app`, when it runs
on a Ray cluster that is up and cannot add nodes, packs every replica the deploy must start (models and ingress;
an autoscaling model's `min_replicas`, and at least one replica of a model that scales to zero must fit alone)
onto the cluster's nodes as Ray would have to: CPUs on one node, a fractional GPU share on one device of it,
whole GPUs as free devices of one node, the accelerator type as a node resource. Best fit, largest first;
what does not fit fails the build with the models named. Clusters that may grow (an autoscaler with node types,
KubeRay's included) and builds without Ray (`serve run` of an import path starts Ray after building) are not
checked. The packing itself is Ray-free; `fixed_cluster_nodes` reads the cluster.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any, Iterable

logger = logging.getLogger(__name__)

_EPS = 1e-6  # Ray's resources have a resolution of 1e-4: sums of shares are compared with this slack


@dataclass(frozen=True)
class Node:
    """A node's logical resources as Ray schedules them."""

    cpus: float
    gpus: int = 0
    accelerator: str | None = None  # Ray's `accelerator_type:<name>` resource of the node
    name: str = ""


@dataclass(frozen=True)
class Demand:
    """The replicas of one deployment: each needs `cpus` and `gpus` (a fraction of one device, or whole ones)."""

    who: str  # "model 'x'" or "the ingress"
    replicas: int
    cpus: float
    gpus: float = 0.0
    accelerator: str | None = None


@dataclass
class _Room:
    node: Node
    cpus: float
    devices: list[float] = field(default_factory=list)  # free fraction of each GPU


def unplaced(demands: Iterable[Demand], nodes: Iterable[Node]) -> dict[str, int]:
    """Replicas that do not fit, per deployment (empty: everything fits), packing largest first, each on the
    node (and device) it fits most tightly."""
    rooms = [_Room(n, n.cpus, [1.0] * n.gpus) for n in nodes]
    items = [d for d in demands for _ in range(d.replicas)]
    items.sort(key=lambda d: (-d.gpus, -d.cpus))
    missing: dict[str, int] = {}
    for d in items:
        if not _place(d, rooms):
            missing[d.who] = missing.get(d.who, 0) + 1
    return missing


def _place(d: Demand, rooms: list[_Room]) -> bool:
    best, best_key = None, None
    for room in rooms:
        if d.accelerator and room.node.accelerator != d.accelerator:
            continue
        if room.cpus + _EPS < d.cpus:
            continue
        if d.gpus <= 0:
            key = (room.cpus - d.cpus,)
            device = None
        elif d.gpus >= 1:
            whole = [i for i, free in enumerate(room.devices) if free >= 1 - _EPS]
            if len(whole) < d.gpus:
                continue
            device, key = whole[:int(d.gpus)], (len(whole) - d.gpus, room.cpus - d.cpus)
        else:
            fits = [(free - d.gpus, i) for i, free in enumerate(room.devices) if free + _EPS >= d.gpus]
            if not fits:
                continue
            left, i = min(fits)
            device, key = [i], (left, room.cpus - d.cpus)
        if best_key is None or key < best_key:
            best, best_key = (room, device), key
    if best is None:
        return False
    room, device = best
    room.cpus -= d.cpus
    for i in device or ():
        room.devices[i] -= min(d.gpus, 1.0)
    return True


def check(demands: list[Demand], nodes: list[Node]) -> None:
    """Raise ValueError naming every deployment whose replicas the nodes cannot all hold at once, and any
    replica that fits no node even alone."""
    problems = []
    for d in demands:
        if d.replicas == 0 and unplaced([Demand(d.who, 1, d.cpus, d.gpus, d.accelerator)], nodes):
            problems.append(f"{d.who}: one replica ({_needs(d)}) fits no node")
    missing = unplaced(demands, nodes)
    for d in demands:
        if d.who in missing:
            problems.append(f"{d.who}: {missing[d.who]} of {d.replicas} replica(s) ({_needs(d)} each) do not fit")
    if problems:
        total_cpus = sum(n.cpus for n in nodes)
        total_gpus = sum(n.gpus for n in nodes)
        wanted_cpus = sum(d.cpus * d.replicas for d in demands)
        wanted_gpus = sum(d.gpus * d.replicas for d in demands)
        raise ValueError(
            "Ray cannot place this application on the running cluster, whose nodes are fixed (no autoscaler "
            f"can add any): {'; '.join(problems)}. The deploy asks for {wanted_cpus:g} CPU and {wanted_gpus:g} GPU "
            f"at once; the cluster has {total_cpus:g} CPU and {total_gpus} GPU over {len(nodes)} node(s) "
            f"({', '.join(_describe(n) for n in nodes)}). A fractional num_gpus must fit on ONE device next to the "
            "others packed there; Ray's CPUs are logical (start Ray with more, `ray start --head --num-cpus N`, or "
            "lower num_cpus), and CPU replicas share the node's real CPUs whatever they reserve.")


def _needs(d: Demand) -> str:
    parts = [f"{d.cpus:g} CPU"]
    if d.gpus:
        parts.append(f"{d.gpus:g} GPU")
    if d.accelerator:
        parts.append(f"accelerator_type {d.accelerator}")
    return ", ".join(parts)


def _describe(n: Node) -> str:
    gpus = f", {n.gpus} GPU" + (f" {n.accelerator}" if n.accelerator else "") if n.gpus else ""
    return f"{n.cpus:g} CPU{gpus}"


# --- the application's demand, from the options build_app gives Ray ---------------------------------------------

def initial_replicas(options: dict[str, Any]) -> int:
    """The replicas Ray starts a deployment of these options with: `num_replicas` (1 for "auto", whose
    autoscaling starts at one), or an autoscaling_config's min_replicas (default 1), or initial_replicas when
    given (0: a scale-to-zero model starts none)."""
    scaling = options.get("autoscaling_config")
    if scaling is None:
        replicas = options.get("num_replicas", 1)
        return replicas if isinstance(replicas, int) else 1
    scaling = scaling if isinstance(scaling, dict) else dict(scaling)
    return max(int(scaling.get("min_replicas", 1)), int(scaling.get("initial_replicas") or 0))


def demand_of(who: str, options: dict[str, Any]) -> Demand:
    """The replicas a deployment's Ray options must start at deploy time and what each reserves."""
    actor = options.get("ray_actor_options", {})
    return Demand(who, initial_replicas(options), float(actor.get("num_cpus", 1.0)),
                  float(actor.get("num_gpus", 0) or 0), actor.get("accelerator_type"))


# --- the running cluster ------------------------------------------------------------------------------------------

def fixed_cluster_nodes() -> list[Node] | None:
    """The alive nodes of the running Ray cluster when it cannot grow; None when Ray is not up in this process,
    when the cluster may add nodes, or when that cannot be told."""
    try:
        import ray
        if not ray.is_initialized():
            return None
        alive = [n for n in ray.nodes() if n.get("Alive")]
        if not alive or not _cannot_grow({n["NodeID"] for n in alive}):
            return None
        return [_node(n) for n in alive]
    except Exception as exc:  # noqa: BLE001 - the check is a help: never fail a build because it cannot run
        logger.info("placement check skipped: %s", exc)
        return None


def _node(raw: dict) -> Node:
    res = raw.get("Resources", {})
    accelerators = [k.split(":", 1)[1] for k in res if k.startswith("accelerator_type:")]
    return Node(cpus=float(res.get("CPU", 0)), gpus=int(res.get("GPU", 0)),
                accelerator=accelerators[0] if accelerators else None, name=raw.get("NodeManagerAddress", ""))


def _cannot_grow(node_ids: set[str]) -> bool:
    """Whether Ray's autoscaler only mirrors the nodes that are there (a cluster started by `ray start` or
    `ray.init` without an autoscaling config: Ray 2.60's monitor then gives each node its own read-only node
    type, `node_<id>`). An autoscaler with node types (the cluster launcher's, KubeRay's, autoscaler v2's
    published cluster config) may add nodes: not fixed. No status yet: unknown, so not fixed."""
    from ray._private.state import state
    from ray.autoscaler._private.util import format_readonly_node_type
    from ray.experimental.internal_kv import _internal_kv_get

    if state.get_cluster_config() is not None:
        return False
    raw = _internal_kv_get("__autoscaling_status")
    if not raw:
        return False
    mapping = (json.loads(raw).get("autoscaler_report") or {}).get("node_type_mapping") or {}
    return bool(mapping) and node_ids <= set(mapping) and all(
        node_type == format_readonly_node_type(node_id) for node_id, node_type in mapping.items())
