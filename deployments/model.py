"""One Ray Serve deployment per served model: loads it once, batches requests by a token budget.

Thin on purpose: loading and scoring are models/ (`load_scorer`, `Scorer.score`); this class only
adds what Ray gives (batching across requests, replicas, health checks, metrics).
"""
from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from ray import serve

from autoscaling import WorkTracker
from models.cutting import plan_groups, scatter
from models.encoded import EncodedBatch
from models.errors import InputError
from serve_app.cpu_share import CpuShare
from serve_app.resources import model_torch_threads, usable_cpus
from serve_app.settings import ModelSettings

logger = logging.getLogger("ray.serve")

# Replaced per replica by the model's token budget (see __init__); the decorator needs a start value.
_INITIAL_TOKEN_BUDGET = 16384
# Device errors after which the CUDA context cannot be trusted (an illegal address, a device-side assert): fatal at
# once. Running out of memory is not one of them (models.scoring.is_out_of_memory): it fails one batch, not the device.
_FATAL_MARKERS = ("CUDA error", "CUBLAS_STATUS", "CUDNN_STATUS", "device-side assert")


@dataclass
class Work:
    """One queued request, or one forward chunk of a request bigger than the token budget."""

    batch: EncodedBatch
    arrived: float  # time.monotonic() when the request reached the replica
    tokens: int = 0  # the tokens its forward computes (a shared prefix once: Scorer.computed_tokens); 0: unknown


def batch_tokens(works: Sequence[Work]) -> int:
    """`batch_size_fn` of the batcher: the tokens a batch would compute (each work's shared prefixes once).

    Must never raise: an exception here kills Ray's batch queue and every later request hangs.
    """
    total = 0
    for w in works:
        try:
            total += max(1, int(w.tokens or w.batch.num_tokens))
        except Exception:
            total += 1
    return total


def split_by_chunks(batch: EncodedBatch, chunks: Sequence[np.ndarray]) -> list[EncodedBatch]:
    """The sub-batch of each forward chunk of a request too big for one batch (`Scorer.plan` plans them,
    models/cutting.py; the sub-batches keep their shared-prefix marks).

    Ray's batcher fails an item larger than its budget, so a big request is queued as its chunks, which batch
    like any other request. The chunks are length-sorted, so each holds sequences of similar length: cutting
    the request in arrival order instead padded every chunk to its longest pair.
    """
    return [batch.select(index) for index in chunks]


class _Metrics:
    """Per-model Prometheus metrics (exported with Ray's `ray_` prefix, tagged with deployment/replica)."""

    def __init__(self, model_name: str):
        from ray.serve.metrics import Counter, Histogram

        tags = ("model",)
        self.pairs = Counter("rerank_pairs_scored", description="Sequences scored (of a listwise model: documents).",
                             tag_keys=tags)
        self.tokens = Counter("rerank_tokens_scored", description="Tokens scored.", tag_keys=tags)
        self.fill = Histogram("rerank_batch_token_fill", description="Tokens of a forward batch / token budget.",
                              boundaries=[0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0], tag_keys=tags)
        latency_s = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30]
        self.queue_wait = Histogram("rerank_queue_wait_seconds", description="Arrival at the replica to "
                                    "start of the forward batch.", boundaries=latency_s, tag_keys=tags)
        self.latency = Histogram("rerank_request_latency_seconds", description="Scoring time of a request "
                                 "in the replica, queueing included.", boundaries=latency_s, tag_keys=tags)
        self.batch_sequences = Histogram("rerank_batch_sequences", description="Sequences of a forward batch.",
                                         boundaries=[1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096], tag_keys=tags)
        for m in (self.pairs, self.tokens, self.fill, self.queue_wait, self.latency, self.batch_sequences):
            m.set_default_tags({"model": model_name})


class _TokenBudgetWarningFilter(logging.Filter):
    """Ray warns when max_batch_size exceeds max_ongoing_requests; here max_batch_size counts tokens."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "larger than `max_ongoing_requests`" not in record.getMessage()


class ModelReplica:
    """The model deployment's class; `ModelDeployment` below is it wrapped by `@serve.deployment`."""

    # A CPU replica's place in its node's CPU registry (serve_app/cpu_share.py): each forward holds CPU slots.
    cpu_share: CpuShare | None = None
    # A fractional GPU share's memory cap (models/device_share.py), None otherwise.
    gpu_memory: Any = None

    def __init__(self, model: ModelSettings, hf_token: str | None = None):
        from models import ModelLoadError, load_scorer
        from models.device_share import cap_gpu_memory, share_token_budget, within_share

        self.settings = model
        device = model.resolved_device
        # Sized here, at runtime: only the replica knows the CPUs of the machine it landed on (serve_app/resources).
        self.cpus_seen = usable_cpus()
        threads, self.threads_from = model_torch_threads(model.num_cpus, device, self.cpus_seen)
        self.torch_threads = threads
        if device == "cpu":
            # The CPU replicas of a node share its CPUs: each forward runs as many threads as it holds slots, so
            # together they never run more compute threads than the node has CPUs (serve_app/cpu_share.py).
            self.cpu_share = CpuShare(_node_key(), cpus=self.cpus_seen, model=model.name,
                                      threads=threads if model.num_cpus is not None else None)
            _one_interop_thread()
        if threads is not None:
            import torch
            torch.set_num_threads(threads)  # Ray sets 1 (OMP_NUM_THREADS) in an actor of fractional num_cpus
        # Every forward runs on this one thread: OpenMP sizes its pool per calling thread, so the thread count
        # is set where the work runs, and the pool stays warm instead of moving between to_thread workers.
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"forward-{model.name}",
                                            initializer=_set_torch_threads, initargs=(threads,))
        if device == "cuda":
            try:  # before the weights load: a model its share cannot hold fails here, not at its first request
                self.gpu_memory = cap_gpu_memory(model.num_gpus)
            except ValueError as exc:
                raise ModelLoadError(model.model_id, f"model {model.name!r}: invalid GPU share: {exc}; raise "
                                                     "num_gpus") from None
        logger.info("loading model %r from %s (revision %s, family %s, dtype %s, device %s%s)", model.name,
                    model.model_id, model.revision or "default", model.family, model.dtype, device,
                    f", {self.gpu_memory}" if self.gpu_memory else "")
        start = time.perf_counter()
        with within_share(self.gpu_memory, model.name, model.model_id, "its weights and warm-up batch",
                          "raise num_gpus"):
            self.scorer = load_scorer(model.model_id, revision=model.revision, family=model.family,
                                      dtype=model.dtype, device=device, max_length=model.max_length,
                                      token=hf_token,
                                      token_budget=share_token_budget(model.token_budget, device, model.num_gpus),
                                      shared_prefix=model.shared_prefix)
            # Fail the deploy now, with the model and the cause, if no forward can run (a kernel the installed
            # torch lacks, a dtype the device refuses): on the forward thread, as every request will run.
            warm = self._executor.submit(self._on_cpus, self.scorer.warmup)
            self.load_time_s = time.perf_counter() - start
            warm.result()
        if self.gpu_memory is not None:
            self._executor.submit(self._probe_token_budget).result()
        self.token_budget = int(self.scorer.token_budget)
        logger.info("loaded model %r (%s, %s on %s, %s execution, %s parameters) in %.2fs, warmed up in %.2fs; "
                    "token budget %d", model.name, self.scorer.family, _dtype_name(self.scorer.dtype),
                    self.scorer.device, getattr(self.scorer, "execution", "?"), f"{self.scorer.num_parameters:,}",
                    self.load_time_s, time.perf_counter() - start - self.load_time_s, self.token_budget)
        logger.addFilter(_TokenBudgetWarningFilter())
        self._score_batched.set_max_batch_size(self.token_budget)
        self._score_batched.set_batch_wait_timeout_s(model.max_batch_wait_s)
        self._fatal: str | None = None
        self.metrics = _Metrics(model.name)
        # The work this replica holds, for the work-based autoscaling policy (autoscaling/policy.py).
        self.work = WorkTracker(token_budget=self.token_budget)

    async def score(self, batch: EncodedBatch) -> np.ndarray:
        """Raw float32 scores of every sequence of `batch` (one request), in order."""
        arrived = time.monotonic()
        tokens = self.scorer.computed_tokens(batch)  # what the forwards compute: a shared prefix once
        # Held from arrival to answer: waiting in the batch queue counts as much as being scored.
        with self.work.track(tokens=tokens, pairs=len(batch)):
            if tokens <= self.token_budget:
                raw = await self._score_queued(batch, arrived, tokens)
            else:
                # Listwise: whole lists only (a list's blocks are merged in one score call); a list over the
                # budget then takes a forward of its own, as a single over-long sequence does.
                chunks = (self.scorer.plan(batch) if batch.groups is None
                          else plan_groups(batch.lengths, batch.groups, self.token_budget))
                parts = await asyncio.gather(*(self._score_queued(sub, arrived)
                                               for sub in split_by_chunks(batch, chunks)))
                raw = scatter([batch.score_index(c) for c in chunks], parts, batch.num_scores)
        self.metrics.latency.observe(time.monotonic() - arrived)
        return raw

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Ray Serve's custom autoscaling metrics hook (2.60: called on the replica every
        `look_back_period_s` x 0.2, at most `metrics_interval_s`; a dict of str -> int | float, or the
        replica disables it). The mean work held since the last call, and this replica's token budget."""
        return self.work.autoscaling_stats()

    async def _score_queued(self, batch: EncodedBatch, arrived: float, tokens: int | None = None) -> np.ndarray:
        """`batch` through the batcher, or alone when over the budget; `tokens`: its computed_tokens if known."""
        tokens = self.scorer.computed_tokens(batch) if tokens is None else tokens
        if tokens > self.token_budget:
            # A single sequence longer than the whole budget: its own forward pass, outside the batcher.
            return await self._forward(batch)
        result = await self._score_batched(Work(batch, arrived, tokens))
        if isinstance(result, BaseException):
            raise result
        return result

    @serve.batch(max_batch_size=_INITIAL_TOKEN_BUDGET, batch_wait_timeout_s=0.005, batch_size_fn=batch_tokens)
    async def _score_batched(self, works: list[Work]) -> list[np.ndarray | BaseException]:
        """Work of several requests in one forward pass; each gets its own slice of the scores back."""
        now = time.monotonic()
        for w in works:
            self.metrics.queue_wait.observe(now - w.arrived)
        merged = EncodedBatch.concat([w.batch for w in works])
        try:
            raw = await self._forward(merged)
        except Exception as exc:
            if len(works) == 1:
                return [exc]
            # Isolate the failure: each request alone, so only the one that fails gets an error.
            logger.warning("batch of %d requests failed (%r); scoring them one by one", len(works), exc)
            return [await self._forward_or_error(w.batch) for w in works]
        self.metrics.fill.observe(batch_tokens(works) / self.token_budget)
        self.metrics.batch_sequences.observe(len(merged))
        bounds = np.cumsum([0] + [w.batch.num_scores for w in works])
        return [raw[a:b] for a, b in zip(bounds[:-1], bounds[1:])]

    async def _forward_or_error(self, batch: EncodedBatch) -> np.ndarray | BaseException:
        try:
            return await self._forward(batch)
        except Exception as exc:
            return exc

    async def _forward(self, batch: EncodedBatch) -> np.ndarray:
        """Scorer.score on the one forward thread: forwards never overlap, and the event loop stays free."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._forward_sync, batch)

    def _forward_sync(self, batch: EncodedBatch) -> np.ndarray:
        try:
            raw = np.asarray(self._on_cpus(self.scorer.score, batch), dtype=np.float32)
        except Exception as exc:
            if self._fatal is None:
                self._fatal = self._broken_by(exc)
            raise
        if raw.shape != (batch.num_scores,):
            raise RuntimeError(f"scorer returned {raw.shape} scores for {batch.num_scores} (of {len(batch)} "
                               "sequences)")
        self.metrics.pairs.inc(batch.num_scores)
        self.metrics.tokens.inc(batch.num_tokens)
        return raw

    def _on_cpus(self, fn, *args):
        """fn(*args) on the forward thread, holding this replica's CPU slots and running as many torch threads
        (CPU replicas; others run it as is)."""
        if self.cpu_share is None:
            return fn(*args)
        with self.cpu_share.forward() as threads:
            if threads != self.torch_threads:
                import torch
                torch.set_num_threads(threads)
                self.torch_threads = threads
            return fn(*args)

    def _probe_token_budget(self) -> None:
        """Under a GPU memory cap: one forward of a full token budget must fit, or the deploy fails now."""
        from models.device_share import probe_token_budget, within_share

        what = f"a forward of its token budget ({int(self.scorer.token_budget)} tokens)"
        fix = "set a smaller token_budget or raise num_gpus"
        with within_share(self.gpu_memory, self.settings.name, self.settings.model_id, what, fix):
            probe_token_budget(self.scorer)

    def _broken_by(self, exc: Exception) -> str | None:
        """Why a failed forward means this replica is broken (it then reports unhealthy and Ray replaces it),
        or None when the failure may be the request's own.

        Device errors that break the CUDA context are fatal at once. Out of device memory is the batch's fault (the
        scorer already retried it in smaller parts and released the memory); like any other error that is not bad
        input it re-runs the warm-up batch as a probe (on this forward thread): only if that fails too can no
        request succeed here."""
        from models.scoring import is_out_of_memory  # torch: loaded by the replica's scorer by now

        cause = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, InputError):
            return None
        if not is_out_of_memory(exc) and any(marker in str(exc) for marker in _FATAL_MARKERS):
            return f"model {self.settings.name!r} hit a fatal device error: {cause}"
        try:
            self.scorer.warmup()
        except Exception as probe:  # noqa: BLE001 - any failure of the probe batch means the replica is broken
            logger.error("model %r: a forward failed (%s) and the warm-up probe failed too (%s); reporting "
                         "unhealthy", self.settings.name, cause, probe)
            return f"model {self.settings.name!r} cannot score the warm-up batch any more: {probe} " \
                   f"(first failure: {cause})"
        return None

    def describe(self) -> dict[str, Any]:
        """What /info reports about the loaded model, and how this replica uses its node's CPUs and GPU share."""
        out = {"family": self.scorer.family, "dtype": _dtype_name(self.scorer.dtype),
               "device": str(self.scorer.device), "execution": self.scorer.execution,
               "max_length": self.scorer.max_length,
               "token_budget": self.token_budget, "num_parameters": int(self.scorer.num_parameters),
               "load_time_s": round(self.load_time_s, 3),
               "shared_prefix": bool(self.scorer.prefix_sharing),
               "torch_threads": self.torch_threads, "torch_threads_from": self.threads_from,
               "torch_threads_why": "torch's own setting: the forward runs on the GPU",
               "cpus_seen": self.cpus_seen, "cpu_node": None,
               "gpu_memory": self.gpu_memory.describe() if self.gpu_memory is not None else None}
        if self.cpu_share is not None:
            out["torch_threads"] = self.cpu_share.last_threads or self.cpu_share.wanted()[0]
            out["torch_threads_why"] = self.cpu_share.why()
            out["cpu_node"] = self.cpu_share.snapshot()
        return out

    def check_health(self) -> None:
        """Called by Ray Serve periodically; raising makes it replace this replica."""
        if self._fatal is not None:
            raise RuntimeError(self._fatal)


def _node_key() -> str:
    """The registry key of this replica's node: its Ray node id (two Ray clusters on one machine never share);
    outside Ray (a replica built in a plain process), one key for the machine."""
    try:
        import ray
        if ray.is_initialized():
            return ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001 - no Ray context: the machine is the node
        pass
    return "local"


def _one_interop_thread() -> None:
    """torch's inter-op pool to one thread (its intra-op threads are what the CPU slots count). Only possible
    before any inter-op work in the process; a second replica built in one process keeps what the first set."""
    import torch
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass


def _set_torch_threads(threads: int | None) -> None:
    if threads is not None:
        import torch
        torch.set_num_threads(threads)


def _dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


ModelDeployment = serve.deployment(ModelReplica)
