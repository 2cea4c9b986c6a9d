"""The node's CPU registry and slot jobserver (serve_app/cpu_share.py), with real processes.

Each worker process is a stand-in for a model replica: it joins the registry of one node key and runs "forwards"
(a short sleep) inside `CpuShare.forward()`, adding the threads it was given to a counter shared by all workers
while it runs. The counter's maximum is the number of compute threads that ran at once on the node.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from serve_app import cpu_share
from serve_app.cpu_share import ACTIVE_WINDOW_S, LIVENESS_PERIOD_S, Census, CpuShare, node_dir

CTX = mp.get_context("fork")  # the workers need only this module: no interpreter start per process


def _worker(root, key, cpus, threads, seconds, running, peak, counts, waits, index, lock, start):
    share = CpuShare(key, cpus=cpus, model=f"m{index}", threads=threads, root=Path(root))
    start.wait()
    deadline = time.monotonic() + seconds
    longest = 0.0
    n = 0
    while time.monotonic() < deadline:
        asked = time.perf_counter()
        with share.forward() as got:
            longest = max(longest, time.perf_counter() - asked)
            with lock:
                running.value += got
                peak.value = max(peak.value, running.value)
            time.sleep(0.002 + 0.001 * (index % 3))  # the forward
            with lock:
                running.value -= got
        n += 1
    counts[index], waits[index] = n, longest
    share.close()


def run_workers(root, key, cpus, kinds, seconds):
    """Run one process per entry of `kinds` (None: node share; n: explicit n threads) for `seconds`;
    (peak threads running at once, forwards per worker, longest wait per worker)."""
    running, peak = CTX.Value("i", 0, lock=False), CTX.Value("i", 0, lock=False)
    counts, waits = CTX.Array("i", len(kinds)), CTX.Array("d", len(kinds))
    lock, start = CTX.Lock(), CTX.Event()
    procs = [CTX.Process(target=_worker, args=(str(root), key, cpus, threads, seconds, running, peak, counts,
                                                waits, i, lock, start)) for i, threads in enumerate(kinds)]
    for p in procs:
        p.start()
    start.set()
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0, f"worker exited with {p.exitcode}"
    return peak.value, list(counts), list(waits)


def test_many_replicas_never_run_more_threads_than_cpus_and_none_starves(tmp_path):
    # Eight replicas on two CPUs, one of them with an explicit 2 threads (it needs the whole node at once).
    kinds = [None] * 7 + [2]
    peak, counts, waits = run_workers(tmp_path, "node-a", 2, kinds, seconds=2.0)
    assert peak == 2, peak  # the CPUs were used, and never oversubscribed
    shared = counts[:7]
    mean = sum(shared) / len(shared)
    assert min(shared) >= 0.3 * mean, counts  # the turnstile serves every waiter in turn
    assert counts[7] >= 0.2 * mean, counts  # the two-slot replica is not starved by one-slot ones
    assert max(waits) < 1.0, waits


def test_one_replica_alone_gets_every_cpu(tmp_path):
    share = CpuShare("node", cpus=4, model="a", root=tmp_path)
    try:
        with share.forward() as threads:
            assert threads == 4
        assert share.snapshot()["replicas"][0]["torch_threads"] == 4
    finally:
        share.close()


def test_explicit_threads_are_kept_and_take_at_most_every_slot(tmp_path):
    fixed = CpuShare("node", cpus=2, model="big", threads=4, root=tmp_path)
    other = CpuShare("node", cpus=2, model="small", root=tmp_path)
    try:
        with fixed.forward() as threads:
            assert threads == 4  # num_cpus keeps its meaning
            got = []
            t = threading.Thread(target=lambda: got.append(_forward_once(other)))
            t.start()
            t.join(0.3)
            assert t.is_alive()  # every slot is held: the other replica waits
        t.join(5)
        assert got == [1]  # sized while the explicit replica held both CPUs: the one thread it may always have
        assert fixed.census().fixed_active_threads == 2  # its threads count at most the node's CPUs
    finally:
        fixed.close()
        other.close()


def _forward_once(share: CpuShare) -> int:
    with share.forward() as threads:
        return threads


def _busy(root, key, cpus, stop, ready):
    share = CpuShare(key, cpus=cpus, model="busy", root=Path(root))
    ready.set()
    while not stop.is_set():
        with share.forward():
            time.sleep(0.005)
    share.close()


def test_the_share_follows_replicas_that_start_go_idle_and_stop(tmp_path, monkeypatch):
    monkeypatch.setattr(cpu_share, "CENSUS_TTL_S", 0.0)
    me = CpuShare("node", cpus=4, model="a", root=tmp_path)
    try:
        assert me.wanted() == (4, 1)
        stop, ready = CTX.Event(), CTX.Event()
        procs = [CTX.Process(target=_busy, args=(str(tmp_path), "node", 4, stop, ready)) for _ in range(3)]
        for p in procs:
            p.start()
        assert ready.wait(30)
        time.sleep(0.3)
        assert me.census().shared_active == 4 and me.wanted() == (1, 1)  # four busy: one CPU each
        stop.set()  # they finish their last forward and leave
        for p in procs:
            p.join(30)
        assert me.wanted() == (4, 1)

        # Registered but idle past the active window: does not count.
        idle = CpuShare("node", cpus=4, model="idle", root=tmp_path)
        _forward_once(idle)
        assert me.census().shared_active == 2
        time.sleep(ACTIVE_WINDOW_S + 0.05)
        assert me.wanted() == (4, 1)
        idle.close()
    finally:
        me.close()


def _hold_everything(root, key, cpus, ready):
    share = CpuShare(key, cpus=cpus, model="crash", threads=cpus, root=Path(root))
    with share.forward():
        ready.set()
        time.sleep(600)


def test_a_replica_killed_while_holding_its_slots_releases_them(tmp_path, monkeypatch):
    monkeypatch.setattr(cpu_share, "CENSUS_TTL_S", 0.0)
    ready = CTX.Event()
    p = CTX.Process(target=_hold_everything, args=(str(tmp_path), "node", 2, ready))
    p.start()
    assert ready.wait(30)
    me = CpuShare("node", cpus=2, model="a", root=tmp_path)
    try:
        assert me.census().fixed_active_threads == 2  # busy: counted while it holds the node
        got = []
        t = threading.Thread(target=lambda: got.append(_forward_once(me)))
        t.start()
        t.join(0.3)
        assert t.is_alive()
        os.kill(p.pid, signal.SIGKILL)
        p.join(10)
        t.join(5)  # the kernel dropped its locks: the waiter's next look (at most WAKE_TIMEOUT_S) finds them
        assert got == [1] or got == [2]
        time.sleep(LIVENESS_PERIOD_S + 0.05)
        me.census()
        assert [r["model"] for r in me.snapshot()["replicas"]] == ["a"]  # its file is gone too
        assert me.wanted() == (2, 1)
    finally:
        me.close()


def test_node_keys_do_not_share_and_unused_nodes_are_swept(tmp_path):
    a = CpuShare("cluster-1-node", cpus=2, model="a", root=tmp_path)
    b = CpuShare("cluster-2-node", cpus=2, model="b", root=tmp_path)
    try:
        assert a.census().shared_active == 1 and b.census().shared_active == 1
        stale = node_dir("old-cluster", tmp_path)
        CpuShare("old-cluster", cpus=2, model="c", root=tmp_path).close()
        assert stale.is_dir()
        c = CpuShare("cluster-3-node", cpus=2, model="c", root=tmp_path)  # joining sweeps nodes nobody holds
        assert not stale.exists()
        assert node_dir("cluster-1-node", tmp_path).is_dir() and node_dir("cluster-2-node", tmp_path).is_dir()
        c.close()
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("census, share", [
    (Census(2, 1, 0), 2), (Census(2, 2, 0), 1), (Census(2, 8, 0), 1), (Census(3, 2, 0), 2),
    (Census(8, 3, 2), 2), (Census(2, 1, 2), 1), (Census(16, 1, 0), 16),
])
def test_share_arithmetic(census, share):
    assert census.share() == share
