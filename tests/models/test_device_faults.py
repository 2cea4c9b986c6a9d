"""GPU faults stay local, checked on CPU with stand-ins (models/scoring.py, models/attention.py):

- out of device memory fails (after retrying in halves) only the sequences that cannot fit, and releases the
  memory; the scorer keeps working;
- packed execution only where the varlen kernels run (compute capability >= 8.0), decided at load;
- the packed forward reads nothing back from the device (a device-to-host sync would stall the pipelined loop):
  counted with a dispatch mode over every op that needs one;
- an attention argument the packed function cannot honour raises instead of being dropped.
"""
from __future__ import annotations

import logging
import sys
import types

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from models import attention, load_scorer
from models.errors import DeviceMemoryError
from models.scoring import is_out_of_memory, resolve_execution
from tests.tiny_models import DOCS, QUERIES

PAIRS = [(q, d * (1 + i % 3)) for i, (q, d) in enumerate((q, d) for q in QUERIES for d in DOCS)]


# --- out of device memory -----------------------------------------------------------------------------------------

class MemoryLimit:
    """Stands in for a device with room for `max_tokens` padded tokens a forward: a bigger forward raises torch's
    OutOfMemoryError, as the CUDA caching allocator does. Records each forward's size and every release."""

    def __init__(self, scorer, max_tokens: int, error=None):
        self.max_tokens, self.forwards, self.released, self.refused = max_tokens, [], 0, 0
        self.error = error or (lambda n: torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {n} MiB"))
        forward = scorer._forward_padded

        def limited(input_ids, attention_mask, token_type_ids):
            if input_ids.numel() > self.max_tokens:
                self.refused += 1
                raise self.error(input_ids.numel())
            self.forwards.append(tuple(input_ids.shape))
            return forward(input_ids, attention_mask, token_type_ids)

        def release():
            self.released += 1

        scorer._forward_padded, scorer.release_memory = limited, release


@pytest.fixture()
def bert(tiny):
    return load_scorer(str(tiny["bert"]), dtype="float32", device="cpu", token_budget=512)


def test_out_of_memory_retries_in_halves_and_every_score_is_right(bert):
    batch = bert.encoder.encode(PAIRS)
    want = bert.score(batch)
    assert len(bert.chunks(batch.lengths)) >= 2
    limit = MemoryLimit(bert, max_tokens=150)  # far below the 512-token chunks: several halvings
    got = bert.score(batch)
    assert np.abs(got - want).max() <= 1e-5  # the same scores, in input order
    assert limit.refused > 1 and limit.released == limit.refused  # memory handed back after every failure
    assert all(rows * width <= 150 for rows, width in limit.forwards)
    assert sum(rows for rows, _ in limit.forwards) == len(PAIRS)  # each sequence scored exactly once


def test_out_of_memory_in_the_pipelined_cuda_loop_is_recovered(bert):
    """The CUDA path (chunk k queued while k+1 is copied; a fake transfer keeps tensors on the CPU)."""
    from tests.models.test_pipelined_scoring import RecordingTransfer

    batch = bert.encoder.encode(PAIRS)
    want = bert.score(batch)
    bert.transfer = RecordingTransfer([])
    limit = MemoryLimit(bert, max_tokens=300)
    assert np.abs(bert.score(batch) - want).max() <= 1e-5
    assert limit.refused >= 1 and limit.released == limit.refused


def test_a_sequence_that_does_not_fit_alone_fails_alone_and_the_scorer_keeps_working(bert):
    batch = bert.encoder.encode(PAIRS)
    want = bert.score(batch)
    longest = int(batch.lengths.max())
    limit = MemoryLimit(bert, max_tokens=longest - 1)
    with pytest.raises(DeviceMemoryError, match=f"one sequence of {longest} tokens alone") as err:
        bert.score(batch)
    assert err.value.__cause__ is None and err.value.__context__ is None  # no frames (tensors) kept alive
    assert is_out_of_memory(err.value) and limit.released >= 1
    short = np.flatnonzero(batch.lengths < longest)
    assert np.abs(bert.score(batch.select(short)) - want[short]).max() <= 1e-5


@pytest.mark.parametrize("message", ["CUDA error: out of memory", "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when "
                                     "calling `cublasCreate(handle)`"])
def test_runtime_errors_that_are_out_of_memory_are_retried_too(bert, message):
    batch = bert.encoder.encode(PAIRS[:8])
    want = bert.score(batch)
    MemoryLimit(bert, max_tokens=100, error=lambda n: RuntimeError(message))
    assert np.abs(bert.score(batch) - want).max() <= 1e-5


def test_other_errors_are_not_retried(bert):
    calls = []

    def broken(*args):
        calls.append(1)
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    bert._forward_padded = broken
    with pytest.raises(RuntimeError, match="illegal memory access"):
        bert.score(bert.encoder.encode(PAIRS))
    assert len(calls) == 1
    assert not is_out_of_memory(RuntimeError("CUDA error: device-side assert triggered"))


# --- packed execution only where the kernels run -----------------------------------------------------------------

def test_packed_only_on_compute_capability_8_or_newer(monkeypatch, caplog):
    from models import scoring

    kw = dict(supported=True, dtype="bfloat16", model_id="m")
    for capability, expected in [((7, 0), "padded"), ((7, 5), "padded"), ((8, 0), "packed"), ((8, 9), "packed"),
                                 ((9, 0), "packed"), ((12, 0), "packed")]:
        monkeypatch.setattr(scoring, "cuda_capability", lambda device, c=capability: c)
        assert resolve_execution("auto", device="cuda:0", **kw) == expected, capability
        with caplog.at_level(logging.WARNING, logger="models.scoring"):
            caplog.clear()
            assert resolve_execution("packed", device="cuda:0", **kw) == expected
        assert ("older than the 8.0" in caplog.text) == (expected == "padded")
        assert resolve_execution("padded", device="cuda:0", **kw) == "padded"

    def no_cuda(device):
        raise AssertionError("a CPU scorer asked for a CUDA capability")

    monkeypatch.setattr(scoring, "cuda_capability", no_cuda)
    assert resolve_execution("packed", device="cpu", supported=True, dtype="float32", model_id="m") == "packed"
    assert resolve_execution("padded", device="cuda", **kw) == "padded"  # nothing to ask


# --- no device-to-host sync in the packed forward ----------------------------------------------------------------

# Ops that make the host wait for the device: a value read back (item, bool, int of a tensor), or an output whose
# size depends on the data (nonzero, boolean masks, unique, repeat_interleave without output_size).
_READS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default,
          torch.ops.aten.masked_select.default, torch.ops.aten._unique2.default,
          torch.ops.aten.unique_consecutive.default}


class DeviceSyncCounter(TorchDispatchMode):
    """Counts every op of a block that would synchronise with a CUDA device (`syncs`, by op name)."""

    def __init__(self):
        super().__init__()
        self.syncs: list[str] = []

    def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _READS or (func is torch.ops.aten.repeat_interleave.Tensor and kwargs.get("output_size") is None):
            self.syncs.append(str(func))
        if func is torch.ops.aten.index.Tensor and any(t is not None and t.dtype == torch.bool for t in args[1]):
            self.syncs.append("boolean index")
        return func(*args, **kwargs)

    def __enter__(self):
        self._tolist = torch.Tensor.tolist
        counter = self

        def tolist(t):
            counter.syncs.append("tolist")
            return counter._tolist(t)

        torch.Tensor.tolist = tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)


def standin_varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                        window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
    """torch 2.13's varlen_attn signature; the output only needs the right shape (the count is what is checked)."""
    return query * 1.0


@pytest.fixture()
def varlen_kernel(monkeypatch):
    """A stand-in kernel where the code looks torch's up, selected for CPU tensors: the CUDA packed path, on CPU."""
    module = types.ModuleType("torch.nn.attention.varlen")
    module.varlen_attn = standin_varlen_attn
    monkeypatch.setitem(sys.modules, "torch.nn.attention.varlen", module)
    with attention.force_backend("torch_varlen"):
        yield


@pytest.fixture(scope="module")
def llm_dirs(tmp_path_factory):
    from tests.llm_rerankers import build_bge_gemma, build_mxbai, build_st_causal

    root = tmp_path_factory.mktemp("sync")
    return {"st_causal": build_st_causal(root / "st"), "mxbai": build_mxbai(root / "mxbai-rerank-base-v2"),
            "bge_gemma": build_bge_gemma(root / "bge-reranker-v2-gemma")}


@pytest.mark.parametrize("variant", ["qwen3_tied", "st_causal", "mxbai", "bge_gemma", "bert", "xlmr", "modular",
                                     "modernbert_cls", "modernbert_cls_pooling"])
def test_the_packed_forward_of_a_chunk_reads_nothing_back_from_the_device(tiny, llm_dirs, varlen_kernel, variant):
    """What the pipelined loop queues per chunk (`Scorer._run`) must not wait for the device. transformers makes
    one such read per forward when a mask function is registered for the attention implementation (it looks
    for packed sequences in the position ids with `.all()`); "packed" registers none (models/attention.py)."""
    path = llm_dirs.get(variant) or tiny[variant]
    scorer = load_scorer(str(path), dtype="float32", device="cpu", execution="packed")
    assert scorer.execution == "packed"
    batch = scorer.encoder.encode(PAIRS[:12])
    index = np.argsort(batch.lengths, kind="stable")
    inputs = scorer._prepare(batch, index)
    with torch.no_grad(), DeviceSyncCounter() as counter:  # (inference mode hides reads from dispatch modes)
        scores = scorer._run(inputs)
    assert scores.shape == (len(index),)
    assert counter.syncs == []


def test_the_counter_sees_the_reads_it_is_for():
    with DeviceSyncCounter() as counter:
        t = torch.arange(6)
        bool((t > 2).all()), t.tolist(), t[t > 3], torch.repeat_interleave(t[:2], t[:2])
        torch.repeat_interleave(t[:2], t[:2], output_size=1)  # sized by the caller: no read
    assert counter.syncs == ["aten._local_scalar_dense.default", "tolist", "boolean index",
                             "aten.repeat_interleave.Tensor"]


def test_registering_a_mask_function_would_cost_a_read_per_forward(tiny, varlen_kernel):
    """The counter catches the sync this module's fix removed: with a mask function registered for "packed" (what
    models/attention.py did before), the causal forward reads the device once per chunk."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    scorer = load_scorer(str(tiny["qwen3_tied"]), dtype="float32", device="cpu", execution="packed")
    batch = scorer.encoder.encode(PAIRS[:6])
    inputs = scorer._prepare(batch, np.arange(len(batch)))
    AttentionMaskInterface.register(attention.PACKED, lambda *args, **kwargs: None)  # builds no mask either
    try:
        with torch.no_grad(), DeviceSyncCounter() as counter:  # (inference mode hides reads from dispatch modes)
            scorer._run(inputs)
    finally:
        del ALL_MASK_ATTENTION_FUNCTIONS._global_mapping[attention.PACKED]
    assert "aten._local_scalar_dense.default" in counter.syncs


# --- attention arguments the packed function cannot honour ------------------------------------------------------

def _qkv(tokens=6, heads=2, dim=4):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(1, heads, tokens, dim, generator=g) for _ in range(3)]


@pytest.mark.parametrize("name, value", [("softcap", 30.0), ("s_aux", torch.zeros(2)),
                                         ("encoder_hidden_states", torch.zeros(1, 3, 8)), ("some_new_option", 1)])
def test_an_argument_packed_attention_cannot_honour_raises(name, value):
    q, k, v = _qkv()
    module = torch.nn.Module()
    with pytest.raises(NotImplementedError, match=f"cannot honour `{name}`"):
        attention.packed_attention_forward(module, q, k, v, None, **{name: value})


def test_arguments_that_ask_for_nothing_are_fine():
    q, k, v = _qkv()
    cu = torch.tensor([0, 2, 6], dtype=torch.int32)
    out, _ = attention.packed_attention_forward(
        torch.nn.Module(), q, k, v, None, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=4, max_length_k=4,
        softcap=None, s_aux=None, position_ids=torch.arange(6)[None], use_cache=False, deterministic=False,
        output_attentions=False, encoder_hidden_states=None)
    assert out.shape == (1, 6, 2, 4)
    zero_cap, _ = attention.packed_attention_forward(torch.nn.Module(), q, k, v, None, cu_seq_lens_q=cu,
                                                     cu_seq_lens_k=cu, max_length_q=4, max_length_k=4, softcap=0.0)
    assert torch.equal(out, zero_cap)


def test_a_soft_capped_model_under_packed_attention_raises_instead_of_dropping_the_cap():
    """Gemma 2 passes `softcap` to its attention function: packed attention would have computed uncapped logits."""
    from transformers import Gemma2Config, Gemma2Model

    from models.encoded import EncodedBatch
    from models.packing import pack

    torch.manual_seed(0)
    cfg = Gemma2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=64,
                       attn_logit_softcapping=20.0, final_logit_softcapping=None, pad_token_id=0)
    model = Gemma2Model(cfg).eval()
    attention.use(model, packed=True)
    inputs = pack(EncodedBatch.from_lists([[3, 4, 5], [6, 7]]))
    with torch.no_grad(), pytest.raises(NotImplementedError, match="cannot honour `softcap` \\(20.0\\)"):
        model(**inputs.model_kwargs())


# --- on a CUDA device (skipped, not passing, without one; run by `python -m benchmarks.gpu_check`) ---------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("variant", ["qwen3_tied", "bert", "modular"])
def test_cuda_packed_forward_of_a_chunk_never_synchronises(tiny, variant):
    """torch's own sync detector over what the pipelined loop queues per chunk: any host wait raises."""
    scorer = load_scorer(str(tiny[variant]), dtype="bfloat16", device="cuda")
    if torch.cuda.get_device_capability() < (8, 0):
        assert scorer.execution == "padded"
        pytest.skip("packed needs compute capability 8.0")
    assert scorer.execution == "packed"
    batch = scorer.encoder.encode(PAIRS)
    transfer = scorer._transfer()
    inputs = transfer.ready(transfer.upload(scorer._prepare(batch, np.arange(len(batch)))))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.inference_mode():
            scores = scorer._run(inputs)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert scores.shape == (len(batch),)


@pytest.mark.gpu
@needs_cuda
def test_cuda_out_of_memory_is_recovered_in_halves(tiny):
    """A real torch.OutOfMemoryError: the allocator capped just above what the model holds, one chunk of many
    long sequences does not fit; the scores come back equal to an uncapped run and the cache was emptied."""
    scorer = load_scorer(str(tiny["qwen3_tied"]), dtype="float32", device="cuda", execution="padded",
                         token_budget=1 << 22)
    batch = scorer.encoder.encode([(QUERIES[0], " ".join([DOCS[1]] * 8))] * 2048)
    want = scorer.score(batch)
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction((torch.cuda.memory_reserved(0) + (64 << 20)) / total, 0)
    released = []
    release = scorer.release_memory
    scorer.release_memory = lambda: released.append(1) or release()
    try:
        got = scorer.score(batch)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, 0)
    assert released, "the capped forward did not run out of memory: the test proved nothing"
    assert np.abs(got - want).max() <= 1e-4
