"""Count the work a model replica holds, for the work-based autoscaling policy.

A replica holds a request from the moment its method is entered (it may then wait in the
``@serve.batch`` queue) until its scores are returned. ``WorkTracker`` keeps the running totals
(tokens, pairs, requests) and, when Ray asks (``record_autoscaling_stats``, every few seconds), returns
their TIME-WEIGHTED MEAN since the previous ask: a burst that starts and ends between two asks still
counts for the time it was held, where an instantaneous sample would miss it.

Use it from the model deployment (a few lines)::

    from autoscaling import WorkTracker

    class ModelReplica:
        def __init__(self, ...):
            ...                                                    # once the token budget is known:
            self._work = WorkTracker(token_budget=self.token_budget)

        async def score(self, batch: EncodedBatch):                # one call per HTTP request
            with self._work.track(tokens=batch.num_tokens, pairs=len(batch)):
                ...                                                # the existing body

        def record_autoscaling_stats(self) -> dict[str, float]:    # Ray Serve's custom-metrics hook
            return self._work.autoscaling_stats()
"""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator

from autoscaling.policy import TOKEN_BUDGET, WORK_PAIRS, WORK_REQUESTS, WORK_TOKENS


class WorkTracker:
    """Thread-safe running totals of held work and their time-weighted means between two reads.

    Ray may call ``record_autoscaling_stats`` from another thread than the one serving requests
    (user code can run on its own event loop thread), hence the lock.
    """

    def __init__(self, token_budget: int | None = None, clock: Callable[[], float] = time.monotonic):
        """``token_budget``: the replica's batching budget, reported so that a policy target counted in
        budgets (``target_budgets_per_replica``) resolves even when the budget is only known here."""
        if token_budget is not None and token_budget <= 0:
            raise ValueError(f"token_budget must be > 0, got {token_budget!r}")
        self._token_budget = token_budget
        self._clock = clock
        self._lock = threading.Lock()
        self._held = [0.0, 0.0, 0.0]  # tokens, pairs, requests held right now
        self._area = [0.0, 0.0, 0.0]  # integral of each over time since the window opened
        self._window_start = self._last_change = clock()

    def _advance(self, now: float) -> None:
        dt = max(0.0, now - self._last_change)
        for i in range(3):
            self._area[i] += self._held[i] * dt
        self._last_change = now

    def add(self, *, tokens: int, pairs: int) -> None:
        """A request carrying ``pairs`` pairs of ``tokens`` tokens in all has arrived."""
        with self._lock:
            self._advance(self._clock())
            self._held[0] += tokens
            self._held[1] += pairs
            self._held[2] += 1

    def done(self, *, tokens: int, pairs: int) -> None:
        """That request has been answered (or has failed): call exactly once per ``add``."""
        with self._lock:
            self._advance(self._clock())
            self._held[0] = max(0.0, self._held[0] - tokens)
            self._held[1] = max(0.0, self._held[1] - pairs)
            self._held[2] = max(0.0, self._held[2] - 1)

    @contextmanager
    def track(self, *, tokens: int, pairs: int) -> Iterator[None]:
        """``add`` on entry, ``done`` on exit, whatever the outcome (errors and cancellation included)."""
        self.add(tokens=tokens, pairs=pairs)
        try:
            yield
        finally:
            self.done(tokens=tokens, pairs=pairs)

    @property
    def held(self) -> dict[str, float]:
        """The work held right now (not averaged)."""
        with self._lock:
            return dict(zip((WORK_TOKENS, WORK_PAIRS, WORK_REQUESTS), self._held))

    def autoscaling_stats(self) -> dict[str, float]:
        """The mean work held since the previous call, and open a new window.

        Returns the dict Ray Serve's ``record_autoscaling_stats`` hook must return: metric name -> float.
        A zero-length window (two calls at the same instant) reports the work held right now.
        """
        with self._lock:
            now = self._clock()
            self._advance(now)
            span = now - self._window_start
            means = [a / span for a in self._area] if span > 0 else list(self._held)
            self._area = [0.0, 0.0, 0.0]
            self._window_start = now
        stats = dict(zip((WORK_TOKENS, WORK_PAIRS, WORK_REQUESTS), means))
        if self._token_budget is not None:
            stats[TOKEN_BUDGET] = float(self._token_budget)
        return stats
