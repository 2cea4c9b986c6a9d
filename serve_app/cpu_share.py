"""The CPUs of one node, shared by the CPU model replicas on it: a node-local registry and a CPU-slot jobserver.

Why: a CPU replica left at the defaults should use the whole machine when it is alone, yet eight of them on two
cores must not run sixteen OpenMP threads (each one's barriers then wait on threads that the others preempt:
measured 5x slower). Ray's logical `num_cpus` cannot say this (it is a placement hint, shared by all replicas of
a node, and the tests run Ray with more logical CPUs than the machine has), so the replicas of a node agree
among themselves, through files only the kernel arbitrates:

- The registry: one file per replica under `<root>/rerank-serve-cpus/<node key>/replicas/`, on which the
  replica holds an exclusive `flock` for its lifetime. A replica that dies, however it dies, loses the lock with
  its process; the others notice (a lock they can take) and remove the file. Its modification time says until
  when the replica counts as ACTIVE: far in the future while it waits for or runs a forward, then
  `ACTIVE_WINDOW_S` past its last forward. Idle and scaled-away replicas therefore stop counting on their own.
- The slots: `slot-0` ... `slot-{cpus-1}`. Running a forward of n threads takes n slots (non-blocking `flock`
  on n free slot files) and gives them back afterwards, so the compute threads running on the node never
  outnumber its CPUs. A replica at the defaults wants `ceil(cpus / active shared replicas)` (minus the CPUs
  active fixed replicas hold), starts as soon as ONE slot is free and takes any other free ones up to that;
  a replica with an explicit `num_cpus` needs all floor(num_cpus) of its threads (at most the node's CPUs).
- The turnstile: slots are taken only while holding `turnstile` (blocking `flock`), so waiters queue there, and
  a replica that just released its slots has to queue behind them instead of grabbing them back.
- The doorbell: a FIFO that every release writes a byte to; the one waiter (the turnstile's holder) sleeps on
  it, so a freed slot is taken within microseconds instead of at the next poll. It is only a hint: the slot
  locks are the truth, and a waiter also retries every `WAKE_TIMEOUT_S` (a holder that died rings nothing).

Everything is keyed by a node key (the Ray node id, passed in by the deployment), so two Ray clusters on one
machine (test sessions, benchmarks) never share. Ray-free; one `CpuShare` per replica process.
"""
from __future__ import annotations

import fcntl
import json
import math
import os
import re
import secrets
import select
import shutil
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

# A replica counts as active this long after its last forward: long enough to bridge the gap between the
# back-to-back batches of a busy replica (batch assembly, the batcher's wait), short enough that a model that
# served one request a while ago gives its CPUs back to a busy neighbour within a fraction of a second.
ACTIVE_WINDOW_S = 0.2
# The census of active replicas is reused this long (a directory scan and a stat per replica).
CENSUS_TTL_S = 0.01
# How often the registry checks that the replicas it counts are alive (a lock probe per replica file).
LIVENESS_PERIOD_S = 1.0
# A waiter looks at the slots again after this long without a doorbell (only a dead holder rings none).
WAKE_TIMEOUT_S = 0.05
# "Busy" stamp: the modification time of a replica waiting for or running a forward (its lock proves it alive).
_BUSY_NS = 10 * 365 * 86400 * 10**9
_RECORD_BYTES = 1024  # the replica file's JSON, space-padded: one pwrite, never a torn length
_NAME_RE = re.compile(r"^(s|f(\d+))\.(\d+)\.([0-9a-f]+)$")  # s: node share; f<n>: fixed n threads. pid, token


def default_root() -> Path:
    """/dev/shm (memory, gone at reboot) when it is a writable directory, else the temp directory."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK | os.X_OK):
        return shm
    return Path(tempfile.gettempdir())


def node_dir(node_key: str, root: Path | None = None) -> Path:
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", node_key) or "node"
    return Path(root or default_root()) / "rerank-serve-cpus" / safe


@dataclass(frozen=True)
class Census:
    """The node as one replica sees it, for its next forward."""

    cpus: int
    shared_active: int  # active replicas sized by the node share, this one included
    fixed_active_threads: int  # threads of active replicas with an explicit num_cpus

    def share(self) -> int:
        """Threads a replica at the defaults wants: the node's CPUs left by the fixed replicas, divided among
        the active shared ones, rounded up (the slots cap the total anyway), at least one."""
        free = max(1, self.cpus - self.fixed_active_threads)
        return max(1, math.ceil(free / max(1, self.shared_active)))


class CpuShare:
    """One replica's membership of its node's CPU registry.

    `threads=None`: sized by the node share (the default); `threads=n`: always n threads (explicit num_cpus),
    waiting for min(n, cpus) slots before each forward. `close()` (or the process's end) leaves the registry.
    """

    def __init__(self, node_key: str, *, cpus: int, model: str, threads: int | None = None,
                 root: Path | None = None, replica: str | None = None):
        if cpus < 1:
            raise ValueError(f"cpus must be >= 1, got {cpus}")
        if threads is not None and threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self.cpus, self.model, self.fixed = int(cpus), model, threads
        self.dir = node_dir(node_key, root)
        self._lock = threading.Lock()  # one forward at a time per process (the flocks are per process)
        self._census: Census | None = None
        self._census_at = 0.0
        self._alive_checked = 0.0
        self.last_threads: int | None = None
        self._fds: list[int] = []
        self._join_node()  # its lock fd is kept in self._fds for the replica's lifetime
        self._turnstile = self._open(self.dir / "turnstile")
        self._slots = [self._open(self.dir / f"slot-{i}") for i in range(self.cpus)]
        self._doorbell = self._open_doorbell(self.dir / "doorbell")
        self.replica = replica or str(os.getpid())
        self.path, self._fd = self._register()
        self._write_record()
        self._stamp(0)  # idle until its first forward

    # ------------------------------------------------------------------------------------------ joining
    def _open(self, path: Path, flags: int = os.O_RDWR | os.O_CREAT) -> int:
        fd = os.open(path, flags | os.O_CLOEXEC, 0o600)
        self._fds.append(fd)
        return fd

    def _join_node(self) -> int:
        """A shared lock on the node directory's `lock` for this replica's lifetime: a directory whose lock
        nobody holds may be removed by a sweep; a replica that raced with one sees the inode change and retries."""
        for _ in range(100):
            (self.dir / "replicas").mkdir(parents=True, exist_ok=True)
            lock = self.dir / "lock"
            try:
                fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            except FileNotFoundError:  # swept between mkdir and open
                continue
            fcntl.flock(fd, fcntl.LOCK_SH)
            try:
                same = os.stat(lock).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self._fds.append(fd)
                _sweep_unused_nodes(self.dir.parent, keep=self.dir.name)
                return fd
            os.close(fd)
        raise RuntimeError(f"could not join the CPU registry in {self.dir}")

    def _open_doorbell(self, path: Path) -> int:
        try:
            os.mkfifo(path, 0o600)
        except FileExistsError:
            pass
        # O_RDWR: opening a FIFO so never blocks, and with every replica holding a writer no read sees EOF.
        return self._open(path, os.O_RDWR | os.O_NONBLOCK)

    def _register(self) -> tuple[Path, int]:
        """This replica's registry file, locked BEFORE it appears under replicas/ (made aside, locked, renamed
        in), so no liveness probe can ever find it unlocked and take it for a dead replica's."""
        kind = "s" if self.fixed is None else f"f{self.fixed}"
        name = f"{kind}.{os.getpid()}.{secrets.token_hex(4)}"
        aside = self.dir / f".{name}"
        fd = self._open(aside)
        fcntl.flock(fd, fcntl.LOCK_EX)
        path = self.dir / "replicas" / name
        os.rename(aside, path)
        return path, fd

    def _write_record(self) -> None:
        record = {"model": self.model, "replica": self.replica, "pid": os.getpid(),
                  "torch_threads": self.last_threads, "torch_threads_from": self.threads_from}
        data = json.dumps(record).encode()[:_RECORD_BYTES].ljust(_RECORD_BYTES)
        os.pwrite(self._fd, data, 0)

    @property
    def threads_from(self) -> str:
        return "node share" if self.fixed is None else "num_cpus"

    # ------------------------------------------------------------------------------------------ the census
    def census(self, now: float | None = None) -> Census:
        """Active replicas of the node (this one counted as active), reused for CENSUS_TTL_S."""
        now = time.monotonic() if now is None else now
        if self._census is not None and now - self._census_at < CENSUS_TTL_S:
            return self._census
        if now - self._alive_checked >= LIVENESS_PERIOD_S:
            self._alive_checked = now
            self._remove_dead()
        wall = time.time_ns()
        shared, fixed_threads = 0, 0
        for entry in _scan(self.dir / "replicas"):
            match = _NAME_RE.match(entry.name)
            if match is None:
                continue
            if entry.path != str(self.path):
                try:
                    if entry.stat().st_mtime_ns <= wall:
                        continue  # idle past its window
                except FileNotFoundError:
                    continue
            if match.group(1) == "s":
                shared += 1
            else:
                fixed_threads += min(int(match.group(2)), self.cpus)
        self._census = Census(self.cpus, max(1, shared) if self.fixed is None else shared, fixed_threads)
        self._census_at = now
        return self._census

    def _remove_dead(self) -> None:
        """Remove the files of replicas whose lock is free: their process is gone (kill -9 included)."""
        for entry in _scan(self.dir / "replicas"):
            if entry.path == str(self.path) or _NAME_RE.match(entry.name) is None:
                continue
            try:
                fd = os.open(entry.path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pass  # alive
            else:
                try:
                    os.unlink(entry.path)
                except FileNotFoundError:
                    pass
            finally:
                os.close(fd)

    def wanted(self) -> tuple[int, int]:
        """(threads wanted, slots needed before starting) for the next forward."""
        if self.fixed is not None:
            n = min(self.fixed, self.cpus)
            return n, n
        return self.census().share(), 1

    # ------------------------------------------------------------------------------------------ forwards
    @contextmanager
    def forward(self) -> Iterator[int]:
        """Hold CPU slots for one forward; yields the torch threads to run it with.

        Explicit replicas always get their `threads` (holding min(threads, cpus) slots: a setting above the
        node's CPUs takes the whole node while it runs); shared replicas get the slots they hold."""
        with self._lock:
            self._stamp(_BUSY_NS + time.time_ns())  # counted as active while it waits and runs
            try:
                held = self._acquire(*self.wanted())
                threads = self.fixed if self.fixed is not None else len(held)
                try:
                    if threads != self.last_threads:
                        self.last_threads = threads
                        self._write_record()
                        self._stamp(_BUSY_NS + time.time_ns())  # the write moved the stamp to now
                    yield threads
                finally:
                    self._release(held)
            finally:
                self._stamp(time.time_ns() + int(ACTIVE_WINDOW_S * 1e9))

    def _stamp(self, until_ns: int) -> None:
        """Active until `until_ns` (wall clock): the registry file's modification time."""
        os.utime(self._fd, ns=(until_ns, until_ns))

    def _acquire(self, want: int, need: int) -> list[int]:
        """Slots held: waits (in the turnstile's queue) until `need` are held, then adds free ones up to `want`."""
        fcntl.flock(self._turnstile, fcntl.LOCK_EX)
        try:
            held: list[int] = []
            while True:
                self._drain_doorbell()  # before looking: a release after this line rings again
                for i, fd in enumerate(self._slots):
                    if len(held) >= want:
                        break
                    if i in held:
                        continue
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:
                        continue
                    held.append(i)
                if len(held) >= need:
                    return held
                select.select([self._doorbell], [], [], WAKE_TIMEOUT_S)
        finally:
            fcntl.flock(self._turnstile, fcntl.LOCK_UN)

    def _release(self, held: list[int]) -> None:
        for i in held:
            fcntl.flock(self._slots[i], fcntl.LOCK_UN)
        try:
            os.write(self._doorbell, b".")
        except BlockingIOError:  # a full FIFO (nobody waited for a long time): the waiters have a byte already
            pass

    def _drain_doorbell(self) -> None:
        try:
            while os.read(self._doorbell, 65536):
                pass
        except BlockingIOError:
            pass

    # ------------------------------------------------------------------------------------------ reporting
    def snapshot(self) -> dict[str, Any]:
        """The node's CPU replicas as this one sees them (for /info): every live replica's model, threads of its
        last forward, how they are sized, and whether it is active now."""
        self._remove_dead()
        wall = time.time_ns()
        replicas = []
        for entry in _scan(self.dir / "replicas"):
            if _NAME_RE.match(entry.name) is None:
                continue
            try:
                with open(entry.path, "rb") as f:
                    record = json.loads(f.read(_RECORD_BYTES).decode() or "{}")
                active = entry.stat().st_mtime_ns > wall
            except (OSError, ValueError):
                continue  # gone, or being rewritten this instant
            replicas.append({**record, "active": active})
        census = self.census()
        return {"cpus": self.cpus, "active_window_s": ACTIVE_WINDOW_S, "replicas": replicas,
                "active_shared_replicas": census.shared_active,
                "active_fixed_threads": census.fixed_active_threads}

    def why(self) -> str:
        """One sentence on how the next forward's threads are chosen."""
        if self.fixed is not None:
            return (f"num_cpus set: {self.fixed} thread(s), waiting for {min(self.fixed, self.cpus)} of the node's "
                    f"{self.cpus} CPU slot(s) before each forward")
        c = self.census()
        fixed = f" less {c.fixed_active_threads} held by replicas with num_cpus set" if c.fixed_active_threads else ""
        return (f"node share: ceil({c.cpus} CPUs{fixed} / {c.shared_active} active replica(s)) = {c.share()} "
                f"thread(s) at most, the CPU slots free when a forward starts (active: a forward in the last "
                f"{ACTIVE_WINDOW_S} s)")

    def close(self) -> None:
        """Leave the registry (the process's end does the same through the kernel)."""
        try:
            os.unlink(self.path)
        except (FileNotFoundError, AttributeError):
            pass
        for fd in self._fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds = []


def _scan(path: Path) -> list[os.DirEntry]:
    try:
        with os.scandir(path) as it:
            return list(it)
    except FileNotFoundError:
        return []


def _sweep_unused_nodes(parent: Path, keep: str) -> None:
    """Remove the directories of nodes no replica holds any more (earlier Ray clusters on this machine).

    Only under an exclusive lock on their `lock` file, which every member holds shared: a replica joining at
    that moment finds its lock file replaced and retries (CpuShare._join_node)."""
    for entry in _scan(parent):
        if entry.name == keep or not entry.is_dir(follow_symlinks=False):
            continue
        lock = Path(entry.path) / "lock"
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)  # a replica of that node is alive
            continue
        try:
            shutil.rmtree(entry.path, ignore_errors=True)
        finally:
            os.close(fd)
