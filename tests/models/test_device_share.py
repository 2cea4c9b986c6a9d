"""A replica's GPU share (models/device_share.py), on CPU: a fake torch.cuda records the memory cap; out-of-memory
errors are raised by stand-ins; the budget probe batch is built by real tiny encoders."""
from __future__ import annotations

import pytest
import torch

from models.device_share import (GPU_CONTEXT_RESERVE_BYTES, MemoryShare, budget_probe_batch, cap_gpu_memory,
                                 is_out_of_memory, share_token_budget, within_share)
from models.errors import ModelLoadError

GIB = 2**30


class FakeCuda:
    """The parts of torch.cuda that cap_gpu_memory calls, on a device of `total` bytes."""

    def __init__(self, total=80 * GIB):
        self.total, self.fractions = total, []

    def current_device(self):
        return 0

    def get_device_properties(self, index):
        assert index == 0
        return type("Props", (), {"total_memory": self.total})()

    def set_per_process_memory_fraction(self, fraction, index):
        self.fractions.append((fraction, index))


@pytest.mark.parametrize("budget, device, share, expected", [
    (None, "cuda", 1.0, 65536),   # a whole GPU: the device default
    (None, "cuda", 2.0, 65536),
    (None, "cuda", 0.25, 16384),  # a quarter of the device, a quarter of the tokens
    (None, "cuda", 0.3, 19456),   # 19660.8 rounded down to a multiple of 1024
    (None, "cuda", 0.01, 1024),   # never below one step
    (8000, "cuda", 0.25, 8000),   # an explicit budget wins
    (None, "cpu", 0.0, 4096),
])
def test_the_default_token_budget_follows_the_share(budget, device, share, expected):
    assert share_token_budget(budget, device, share) == expected


def test_a_fractional_share_caps_the_allocator_less_the_context_reserve():
    cuda = FakeCuda(total=80 * GIB)
    memory = cap_gpu_memory(0.25, "cuda", cuda=cuda)
    assert memory.cap_bytes == 20 * GIB - GPU_CONTEXT_RESERVE_BYTES
    assert cuda.fractions == [(memory.cap_bytes / (80 * GIB), 0)]
    assert memory.describe() == {"num_gpus": 0.25, "memory_cap_gib": 19.5, "device_memory_gib": 80.0}
    # Replicas Ray packs on one device (shares summing to 1): caps + one context each stay within the device.
    caps = [cap_gpu_memory(s, "cuda", cuda=FakeCuda(80 * GIB)) for s in (0.5, 0.25, 0.125, 0.125)]
    assert sum(c.cap_bytes + GPU_CONTEXT_RESERVE_BYTES for c in caps) == 80 * GIB


def test_a_whole_gpu_is_not_capped_and_a_tiny_share_is_refused():
    cuda = FakeCuda()
    assert cap_gpu_memory(1.0, "cuda", cuda=cuda) is None and cap_gpu_memory(2, "cuda", cuda=cuda) is None
    assert cuda.fractions == []
    with pytest.raises(ValueError, match="num_gpus 0.005 is 0.40 GiB .* less than the 0.5 GiB a CUDA context"):
        cap_gpu_memory(0.005, "cuda", cuda=FakeCuda(80 * GIB))


def test_out_of_memory_is_found_through_wrapping_errors():
    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    assert is_out_of_memory(oom)
    try:
        try:
            raise oom
        except Exception as exc:
            raise ModelLoadError("org/m", "warm-up forward failed") from exc
    except ModelLoadError as wrapped:
        assert is_out_of_memory(wrapped)
    assert not is_out_of_memory(RuntimeError("CUDA error: an illegal memory access"))
    assert not is_out_of_memory(None)


SHARE = MemoryShare(share=0.25, total_bytes=24 * GIB, cap_bytes=6 * GIB - GPU_CONTEXT_RESERVE_BYTES)


def test_running_out_of_the_share_names_the_model_and_the_setting():
    with pytest.raises(ModelLoadError) as e:
        with within_share(SHARE, "ettin-1b", "cross-encoder/ettin-reranker-1b-v1", "its weights and warm-up batch",
                          "raise num_gpus"):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.00 GiB")
    msg = str(e.value)
    assert "model 'ettin-1b': its weights and warm-up batch does not fit its GPU share" in msg
    assert "num_gpus 0.25 caps this replica at 5.50 GiB of the device's 24.00 GiB" in msg
    assert "raise num_gpus" in msg and "cross-encoder/ettin-reranker-1b-v1" in msg
    assert isinstance(e.value.__cause__, torch.OutOfMemoryError)


def test_other_errors_and_uncapped_replicas_pass_through():
    with pytest.raises(KeyError):
        with within_share(SHARE, "m", "org/m", "x", "y"):
            raise KeyError("weights")
    with pytest.raises(torch.OutOfMemoryError):  # a whole GPU: nothing to explain about a share
        with within_share(None, "m", "org/m", "x", "y"):
            raise torch.OutOfMemoryError("CUDA out of memory")


@pytest.mark.parametrize("variant", ["modular", "bert", "qwen3_tied"])
def test_the_budget_probe_is_the_largest_forward_a_replica_runs(tiny, variant):
    from models import load_encoder

    encoder = load_encoder(str(tiny[variant]))
    L = encoder.max_length
    batch = budget_probe_batch(encoder, token_budget=4 * L + 5)
    assert batch.lengths.tolist() == [L] * 4  # max-length sequences filling the budget
    one = budget_probe_batch(encoder, token_budget=L // 2)
    assert one.lengths.tolist() == [L]  # longer than the budget alone: the forward such a sequence gets
