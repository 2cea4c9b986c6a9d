"""A replica's share of a GPU: the memory cap that keeps it to its share, and a token budget sized to it. No Ray.

A fractional `num_gpus` only PLACES replicas (Ray puts several on one device and enforces nothing there). So a
replica with a share s < 1 caps its own caching allocator at s of the device's memory, less a reserve for its
CUDA context (which lives outside the allocator): the caps of the replicas Ray packs on one device (their shares
sum to at most 1) then add up to no more than the device holds. A batch too big for its cap fails with
`torch.OutOfMemoryError` in that replica only, instead of starving its neighbours. The default token budget
(`DEFAULT_TOKEN_BUDGET["cuda"]`, for a whole GPU) shrinks with the share, and the replica checks at load time
that its weights, its warm-up and one forward of a full token budget fit (`probe_token_budget`): a share that
cannot hold the model fails the deploy with the model and the setting named, not the first big request.
`cuda` parameters stand for `torch.cuda` (a fake in the CPU tests).
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch

from .encoded import EncodedBatch
from .errors import ModelLoadError
from .scoring import DEFAULT_TOKEN_BUDGET, resolve_token_budget

# Device memory a process uses outside the caching allocator (CUDA context, kernel images, cuBLAS workspace):
# an estimate (several hundred MiB on recent GPUs), taken off each replica's cap so that the replicas of one
# device together stay within it.
GPU_CONTEXT_RESERVE_BYTES = 512 * 2**20
TOKEN_BUDGET_STEP = 1024  # a share's default budget is rounded down to this, and is at least this
_GIB = 2**30


@dataclass(frozen=True)
class MemoryShare:
    """The memory cap of a replica with a fractional GPU share."""

    share: float
    total_bytes: int
    cap_bytes: int

    @property
    def fraction(self) -> float:
        return self.cap_bytes / self.total_bytes

    def describe(self) -> dict:
        return {"num_gpus": self.share, "memory_cap_gib": round(self.cap_bytes / _GIB, 2),
                "device_memory_gib": round(self.total_bytes / _GIB, 2)}

    def __str__(self) -> str:
        return (f"num_gpus {self.share:g} caps this replica at {self.cap_bytes / _GIB:.2f} GiB of the device's "
                f"{self.total_bytes / _GIB:.2f} GiB ({GPU_CONTEXT_RESERVE_BYTES / _GIB:.1f} GiB kept for its CUDA "
                "context)")


def share_token_budget(token_budget: int | None, device: str, share: float) -> int:
    """The configured budget, else the device's default scaled to a fractional GPU share (a whole GPU's budget x
    share, rounded down to TOKEN_BUDGET_STEP, at least that): activation memory grows with the budget, so a
    quarter of a GPU gets a quarter of the tokens. The ingress cuts requests by the same figure."""
    if token_budget or not device.startswith("cuda") or not 0 < share < 1:
        return resolve_token_budget(token_budget, device)
    scaled = DEFAULT_TOKEN_BUDGET["cuda"] * share
    return max(TOKEN_BUDGET_STEP, math.floor(scaled / TOKEN_BUDGET_STEP) * TOKEN_BUDGET_STEP)


def cap_gpu_memory(share: float, device: str = "cuda", cuda=None) -> MemoryShare | None:
    """Cap this process's allocator on `device` at its share (None for a whole GPU or more: nothing to share).

    Raises ValueError when the share cannot even hold the CUDA context reserve."""
    if not 0 < share < 1:
        return None
    cuda = torch.cuda if cuda is None else cuda
    index = torch.device(device).index
    index = cuda.current_device() if index is None else index
    total = int(cuda.get_device_properties(index).total_memory)
    cap = int(share * total) - GPU_CONTEXT_RESERVE_BYTES
    if cap <= 0:
        raise ValueError(f"num_gpus {share:g} is {share * total / _GIB:.2f} GiB of this {total / _GIB:.2f} GiB "
                         f"device, less than the {GPU_CONTEXT_RESERVE_BYTES / _GIB:.1f} GiB a CUDA context needs")
    cuda.set_per_process_memory_fraction(cap / total, index)
    return MemoryShare(share, total, cap)


def is_out_of_memory(exc: BaseException | None) -> bool:
    """Whether `exc`, or an error it was raised from, is the device running out of memory."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower():
            return True
        exc = exc.__cause__ or exc.__context__
    return False


@contextmanager
def within_share(memory: MemoryShare | None, model_name: str, model_id: str, what: str, fix: str) -> Iterator[None]:
    """Turn running out of the share's memory in the block into a ModelLoadError naming the model and the
    settings to change (`what` did not fit; `fix` says what to set)."""
    try:
        yield
    except Exception as exc:
        if memory is None or not is_out_of_memory(exc):
            raise
        raise ModelLoadError(model_id, f"model {model_name!r}: {what} does not fit its GPU share: {memory}; "
                                       f"{fix} (cause: {type(exc).__name__}: {str(exc)[:300]})") from exc


# A document long enough to be cut to any model's max_length (every word is at least one token).
_PROBE_WORD = "probe "


def budget_probe_batch(encoder, token_budget: int) -> EncodedBatch:
    """The largest forward the replica will run: max-length pairs filling the token budget (in padded and packed
    execution alike: k sequences of L tokens, k x L <= budget), or one max-length pair when that alone is longer
    than the budget (such a sequence gets a forward of its own)."""
    long_pair = ("probe query", _PROBE_WORD * (encoder.max_length + 16))
    one = encoder.encode([long_pair])
    length = int(one.lengths[0])
    k = max(1, token_budget // length)
    return EncodedBatch.concat([one] * k)


def probe_token_budget(scorer) -> None:
    """One forward of a full token budget (see budget_probe_batch): run at load time under a memory cap."""
    scorer.score(budget_probe_batch(scorer.encoder, scorer.token_budget))
