"""The Scorer interface and the two executions behind it.

score(): sort by length, cut into chunks that fit the token budget (models/cutting.py), run each chunk, scatter
the raw scores back to input order. A chunk runs one of two ways (`Scorer.execution`):
- "padded": right-padded [N, S] tensors with a padding mask, attention "sdpa"; the budget counts N × S.
  A family implements `_forward_padded`.
- "packed": one row of real tokens with per-pair boundaries (models/packing.py), attention "packed"
  (models/attention.py); the budget counts real tokens. A family that supports it implements `_forward_packed`.
"auto" picks packed on CUDA of compute capability >= 8.0 in fp16/bf16 when the model supports it (varlen kernels),
padded otherwise: on this CPU, length-sorted padded chunks of 4096 tokens were measured as fast as packed
(benchmarks/cpu_packing.py).
Either way, a scorer that supports it (`supports_shared_prefix`, causal LMs) runs the sequences the ingress marked
as sharing a prefix through `_forward_shared` (models/prefix.py): each prefix once per chunk; the budget counts the
tokens computed.
"""
from __future__ import annotations

import logging

import numpy as np
import torch

from .cutting import plan_chunks, plan_shared_chunks, scatter
from .encoded import EncodedBatch
from .errors import DeviceMemoryError, ModelLoadError

log = logging.getLogger(__name__)

# CPU: 4096 beat 8192 / 16384 for the ettin-17m shape on a 2-core box (smaller chunks stay in cache).
DEFAULT_TOKEN_BUDGET = {"cpu": 4096, "cuda": 65536}
EXECUTIONS = ("auto", "packed", "padded")


def resolve_token_budget(token_budget: int | None, device: str) -> int:
    """The configured budget, else the device's default (the ingress cuts requests by the same figure)."""
    return int(token_budget or DEFAULT_TOKEN_BUDGET["cuda" if device.startswith("cuda") else "cpu"])


def check_execution(requested: str, model_id: str) -> None:
    """The one check of an `execution` setting (run at construction too: fail before the weights load)."""
    if requested not in EXECUTIONS:
        raise ModelLoadError(model_id, f"unknown execution {requested!r}; use one of {EXECUTIONS}")


# flash-attn's varlen kernel and torch's varlen_attn run on Ampere (compute capability 8.0) and newer only.
PACKED_MIN_CAPABILITY = (8, 0)


def cuda_capability(device: str) -> tuple[int, int]:
    """The compute capability of a CUDA device, e.g. (7, 5) for a T4, (8, 0) for an A100."""
    major, minor = torch.cuda.get_device_capability(torch.device(device))
    return int(major), int(minor)


def resolve_execution(requested: str, *, supported: bool, device: str, dtype: str, model_id: str,
                      capability: tuple[int, int] | None = None) -> str:
    """"packed" or "padded", decided once at load. auto: packed where the varlen kernels run (CUDA of compute
    capability >= 8.0, half precision), padded elsewhere (fp32 on CUDA would fall back to one attention call per
    pair; an older GPU has no kernel). "packed" on a model that cannot run packed, or on a CUDA device older than
    the kernels, falls back to padded with a warning, so one deployment setting can cover every model and GPU.
    `capability`: the CUDA device's, queried when None."""
    check_execution(requested, model_id)
    cuda = device.startswith("cuda")
    if cuda and requested != "padded":
        capability = cuda_capability(device) if capability is None else tuple(capability)
        if capability < PACKED_MIN_CAPABILITY:
            if requested == "packed":
                log.warning("%s: %s has compute capability %d.%d, older than the %d.%d the varlen kernels need; "
                            "running padded", model_id, device, *capability, *PACKED_MIN_CAPABILITY)
            return "padded"
    if requested == "auto":
        fast = cuda and dtype in ("float16", "bfloat16")
        return "packed" if supported and fast else "padded"
    if requested == "packed" and not supported:
        log.warning("%s: packed execution is not supported for this model; running padded", model_id)
        return "padded"
    return requested


# A device allocation that failed, in the messages of errors that are not torch.OutOfMemoryError: the CUDA runtime's
# cudaErrorMemoryAllocation ("CUDA error: out of memory") and a cuBLAS / cuDNN workspace that could not be allocated.
# None of these leaves the CUDA context broken, unlike an illegal address or a device-side assert.
_OUT_OF_MEMORY_MARKERS = ("out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED")


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether `exc` is the device running out of memory: a fault of the batch being run, not of the device."""
    if isinstance(exc, (torch.OutOfMemoryError, DeviceMemoryError)):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc) for m in _OUT_OF_MEMORY_MARKERS)


def pad_right(batch: EncodedBatch, index: np.ndarray, pad_id: int, with_types: bool):
    """(input_ids, attention_mask, token_type_ids | None) of the selected sequences, right-padded, int64."""
    lengths = batch.lengths[index]
    width = int(lengths.max())
    ids = np.full((len(index), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(index), width), dtype=np.int64)
    types = np.zeros((len(index), width), dtype=np.int64) if with_types else None
    for row, (i, n) in enumerate(zip(index, lengths)):
        start = batch.offsets[i]
        ids[row, :n] = batch.input_ids[start:start + n]
        mask[row, :n] = 1
        if types is not None and batch.token_type_ids is not None:
            types[row, :n] = batch.token_type_ids[start:start + n]
    return ids, mask, types


def input_tensors(inputs) -> list[torch.Tensor]:
    """The tensors of one chunk's inputs: a padded (ids, mask, types | None) tuple, a PackedInputs, or inputs that
    list their own (`tensors()`: models.prefix.SharedPrefixInputs)."""
    if isinstance(inputs, tuple):
        return [t for t in inputs if t is not None]
    if hasattr(inputs, "tensors"):
        return inputs.tensors()
    return [t for t in (inputs.input_ids, inputs.position_ids, inputs.cu_seq_lens, inputs.token_type_ids)
            if t is not None]


def move_inputs(inputs, move):
    """`inputs` (as in `input_tensors`) with every tensor replaced by move(tensor)."""
    if isinstance(inputs, tuple):
        return tuple(None if t is None else move(t) for t in inputs)
    if hasattr(inputs, "map_tensors"):
        return inputs.map_tensors(move)
    from dataclasses import replace
    m = lambda t: None if t is None else move(t)  # noqa: E731
    return replace(inputs, input_ids=m(inputs.input_ids), position_ids=m(inputs.position_ids),
                   cu_seq_lens=m(inputs.cu_seq_lens), token_type_ids=m(inputs.token_type_ids))


class CudaTransfer:
    """Host-to-device copies of a CUDA scorer on a side stream, so chunk k+1's copy overlaps chunk k's forward.

    upload(): non-blocking copies of pinned host inputs, issued on the copy stream, plus an event recorded
    after them. ready(): the compute (current) stream waits for that event on the device (the host never
    waits), and each device tensor is marked as used by the compute stream (`record_stream`), so the caching
    allocator does not hand its memory out again before the forward that reads it is done. to_host(): the
    one device-to-host copy of a `score` call. `cuda` is torch.cuda (a fake in the CPU tests).
    """

    def __init__(self, device: str, cuda=None):
        self.cuda = torch.cuda if cuda is None else cuda
        self.device = torch.device(device)
        self.copy_stream = self.cuda.Stream(device=self.device)

    def upload(self, host_inputs):
        with self.cuda.stream(self.copy_stream):
            moved = move_inputs(host_inputs, lambda t: t.to(self.device, non_blocking=True))
            event = self.cuda.Event()
            event.record(self.copy_stream)
        return moved, event

    def ready(self, pending):
        moved, event = pending
        compute = self.cuda.current_stream(self.device)
        compute.wait_event(event)
        for t in input_tensors(moved):
            t.record_stream(compute)
        return moved

    def to_host(self, scores: torch.Tensor) -> np.ndarray:
        return scores.cpu().numpy()


class Scorer:
    """A loaded model: takes an EncodedBatch from the matching Encoder, returns raw float32 scores in input order."""

    family: str
    model_id: str
    dtype: str
    device: str
    max_length: int
    token_budget: int
    num_parameters: int
    execution: str  # "packed" | "padded", resolved once the model is loaded (set_execution)
    position_offset: int = 0  # first position id of a packed sequence (pad_token_id + 1 for RoBERTa / XLM-R)
    shared_prefix: str = "auto"  # "off": prefix marks are ignored, every sequence runs whole (set_shared_prefix)

    def __init__(self, *, family: str, model_id: str, encoder, dtype: str, device: str,
                 token_budget: int | None, pad_id: int, uses_token_types: bool = False, execution: str = "auto"):
        self.family, self.model_id, self.encoder = family, model_id, encoder
        self.dtype, self.device, self.max_length = dtype, device, encoder.max_length
        self.token_budget = resolve_token_budget(token_budget, device)
        self.pad_id, self.uses_token_types = pad_id, uses_token_types
        self.num_parameters = 0
        check_execution(execution, model_id)
        self.requested_execution = execution
        self.execution = "padded"

    @property
    def supports_packed(self) -> bool:
        """Whether this loaded model can run packed (a family overrides it)."""
        return False

    def _attention_modules(self) -> list[torch.nn.Module]:
        """The transformers models whose attention implementation follows the execution mode."""
        return []

    def set_execution(self, requested: str | None = None) -> str:
        """Resolve and apply the execution mode (families call it once their model is loaded). Only packed mode
        switches the attention implementation to "packed"; padded mode keeps transformers' own ("sdpa")."""
        requested = self.requested_execution if requested is None else requested
        self.execution = resolve_execution(requested, supported=self.supports_packed, device=self.device,
                                           dtype=self.dtype, model_id=self.model_id)
        from . import attention

        for model in self._attention_modules():
            if self.execution == "packed":
                attention.use(model, packed=True)
            elif model.config._attn_implementation == attention.PACKED:
                attention.use(model, packed=False)
        return self.execution

    # --- shared prefixes (models/prefix.py) ---------------------------------------------------------------------
    @property
    def supports_shared_prefix(self) -> bool:
        """Whether this loaded model computes marked prefixes once (a causal family overrides it)."""
        return False

    def set_shared_prefix(self, setting: str) -> None:
        """"auto": share the prefixes the ingress marked where the model supports it; "off": never."""
        from .prefix import check_setting

        self.shared_prefix = check_setting(setting)

    @property
    def prefix_sharing(self) -> bool:
        """Whether this scorer computes marked prefixes once: set to "auto" and supported by the model."""
        return self.shared_prefix == "auto" and self.supports_shared_prefix

    def shares_prefixes(self, batch: EncodedBatch) -> bool:
        """Whether `score(batch)` computes some prefix once for several sequences."""
        return batch.prefix_lengths is not None and self.prefix_sharing and len(batch.prefix_groups[1]) > 0

    def computed_tokens(self, batch: EncodedBatch) -> int:
        """Tokens `score(batch)` computes as one chunk: each shared prefix once (what token budgets count)."""
        return batch.computed_tokens if self.shares_prefixes(batch) else batch.num_tokens

    @property
    def shared_packed(self) -> bool:
        """Whether chunks with shared prefixes run packed (else padded): as the execution, unless a family knows
        better."""
        return self.execution == "packed"

    def plan(self, batch: EncodedBatch) -> list[np.ndarray]:
        """The forward chunks of `batch`: `chunks(lengths)`, or around its shared prefixes (models/cutting.py)."""
        if not self.shares_prefixes(batch):
            return self.chunks(batch.lengths)
        group, prefix, _ = batch.prefix_groups
        return plan_shared_chunks(batch.lengths, group, prefix, self.token_budget, packed=self.shared_packed)

    def _shared_inputs(self, batch: EncodedBatch, index: np.ndarray, pin_memory: bool = False):
        """The chunk's models.prefix.SharedPrefixInputs, None when no two of its sequences share a prefix."""
        if not self.shares_prefixes(batch):
            return None
        from .prefix import shared_inputs

        return shared_inputs(batch, index, packed=self.shared_packed, pad_id=self.pad_id, pin_memory=pin_memory)

    def _forward_shared(self, inputs) -> torch.Tensor:
        """Raw scores, shape (N,), of a chunk with shared prefixes (a family that supports them implements it)."""
        raise NotImplementedError

    def score(self, batch: EncodedBatch) -> np.ndarray:
        n = len(batch)
        if n == 0:
            return np.empty(0, dtype=np.float32)
        lengths = batch.lengths
        if lengths.min() < 1:
            raise ValueError("cannot score an empty sequence (no tokens)")
        with torch.inference_mode():
            chunks = self.plan(batch)
            try:
                return scatter([np.concatenate(chunks)], [self._run_chunks(batch, chunks)], n)
            except Exception as exc:
                if not is_out_of_memory(exc):
                    raise
                log.warning("%s: out of device memory on a batch of %d sequences (%d tokens): %s; scoring its "
                            "chunks again, halved where they still do not fit", self.model_id, n,
                            batch.num_tokens, exc)
            # Out of the except block: the failed call's tensors went with its frames; hand them back.
            self.release_memory()
            return scatter(chunks, [self._score_fitting(batch, index) for index in chunks], n)

    def _run_chunks(self, batch: EncodedBatch, chunks: list[np.ndarray]) -> np.ndarray:
        """Raw scores of `chunks`, in chunk order (concatenated): the device pipeline on CUDA, else one chunk after
        the other (CPU: nothing to overlap, each chunk's scores are already host memory)."""
        transfer = self._transfer()
        if transfer is not None:
            return self._score_pipelined(batch, chunks, transfer)
        parts = [self._score_chunk(batch, index) for index in chunks]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _score_fitting(self, batch: EncodedBatch, index: np.ndarray) -> np.ndarray:
        """Raw scores of sequences `index` (in that order) as one chunk; where the device has no memory for it, as
        two halves, recursively. Only a single sequence that does not fit even alone fails: DeviceMemoryError,
        the memory of the failed attempt released (the replica stays healthy for every other request)."""
        try:
            return self._run_chunks(batch, [index])
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            # Only the text is kept: the exception's frames hold the failed forward's tensors.
            cause = f"{type(exc).__name__}: {exc}"
        self.release_memory()
        if len(index) == 1:
            raise DeviceMemoryError(
                f"model {self.model_id!r} ran out of device memory scoring one sequence of "
                f"{int(batch.lengths[index[0]])} tokens alone ({_name(self.dtype)} on {self.device}): {cause}")
        half = len(index) // 2
        return np.concatenate([self._score_fitting(batch, index[:half]), self._score_fitting(batch, index[half:])])

    def release_memory(self) -> None:
        """Hand the caching allocator's free blocks back to the device after an out-of-memory error, so the
        retry (and the replica's other work, and models sharing the GPU) can use them."""
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()

    def _transfer(self) -> "CudaTransfer | None":
        """The host-to-device pipeline of a CUDA scorer (made once), None on CPU. Tests set `transfer`."""
        if getattr(self, "transfer", None) is None and self.device.startswith("cuda"):
            self.transfer = CudaTransfer(self.device)
        return getattr(self, "transfer", None)

    def _score_pipelined(self, batch: EncodedBatch, chunks: list[np.ndarray], transfer) -> np.ndarray:
        """Raw scores of `chunks` in chunk order (concatenated), keeping the device busy:

        chunk k's forward is queued first, then chunk k+1 is packed on the host and copied on the side stream
        while the device runs chunk k; scores stay on the device, and come back in ONE copy at the end (the only
        synchronisation of the call).
        """
        pending = transfer.upload(self._prepare(batch, chunks[0]))
        parts = []
        for k in range(len(chunks)):
            inputs = transfer.ready(pending)  # the compute stream waits for this chunk's copy, not the host
            parts.append(self._run(inputs).float().reshape(-1))  # queued; returns before the device finishes
            if k + 1 < len(chunks):
                pending = transfer.upload(self._prepare(batch, chunks[k + 1]))
        return np.asarray(transfer.to_host(torch.cat(parts) if len(parts) > 1 else parts[0]), dtype=np.float32)

    def _prepare(self, batch: EncodedBatch, index: np.ndarray):
        """Host inputs of one chunk, page-locked on CUDA (an asynchronous copy needs pinned memory)."""
        pin = self.device.startswith("cuda")
        shared = self._shared_inputs(batch, index, pin_memory=pin)
        if shared is not None:
            return shared
        if self.execution == "packed":
            from .packing import pack
            return pack(batch, index, position_offset=self.position_offset, with_token_types=self.uses_token_types,
                        pin_memory=pin)
        ids, mask, types = pad_right(batch, index, self.pad_id, self.uses_token_types)
        host = lambda a: None if a is None else (torch.from_numpy(a).pin_memory() if pin else torch.from_numpy(a))  # noqa: E731
        return host(ids), host(mask), host(types)

    def _run(self, inputs) -> torch.Tensor:
        """The forward of one chunk's device inputs (from `_prepare`, moved): raw scores on the device."""
        if hasattr(inputs, "map_tensors"):
            return self._forward_shared(inputs)
        if self.execution == "packed":
            return self._forward_packed(inputs)
        return self._forward_padded(*inputs)

    def chunks(self, lengths: np.ndarray) -> list[np.ndarray]:
        """Index arrays of the forward chunks `score` runs for sequences of these lengths (models/cutting.py):
        the budget counts padded tokens in padded mode, real tokens in packed mode."""
        return plan_chunks(lengths, self.token_budget, packed=self.execution == "packed")

    def _score_chunk(self, batch: EncodedBatch, index: np.ndarray) -> np.ndarray:
        """One chunk's host scores where there is no CUDA pipeline (CUDA always takes `_score_pipelined`): its
        shared-prefix inputs through `_forward_shared`, else `_score_packed` / `_score_padded`, which build the
        chunk's inputs for `_forward_packed` / `_forward_padded` and run it."""
        shared = self._shared_inputs(batch, index)
        if shared is not None:
            return self._forward_shared(shared.to(self.device)).float().cpu().numpy()
        run = self._score_packed if self.execution == "packed" else self._score_padded
        return run(batch, index)

    def _score_packed(self, batch: EncodedBatch, index: np.ndarray) -> np.ndarray:
        from .packing import pack

        inputs = pack(batch, index, position_offset=self.position_offset, with_token_types=self.uses_token_types)
        scores = self._forward_packed(inputs.to(self.device))
        return scores.float().cpu().numpy()

    def _score_padded(self, batch: EncodedBatch, index: np.ndarray) -> np.ndarray:
        ids, mask, types = pad_right(batch, index, self.pad_id, self.uses_token_types)
        to = lambda a: None if a is None else torch.from_numpy(a).to(self.device)  # noqa: E731
        scores = self._forward_padded(to(ids), to(mask), to(types))
        return scores.float().cpu().numpy()

    def _forward_padded(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        token_type_ids: torch.Tensor | None) -> torch.Tensor:
        """Raw scores, shape (batch,), of right-padded inputs."""
        raise NotImplementedError

    def _forward_packed(self, inputs) -> torch.Tensor:
        """Raw scores, shape (N,), of packed inputs (models.packing.PackedInputs, on the device)."""
        raise NotImplementedError

    # Past ModernBERT's 128-token local window (ettin), so sliding layers run on the warm-up batch too.
    WARMUP_PAIRS = (("warm-up query", "a short warm-up passage"),
                    ("warm-up query", " ".join(["the quick brown fox jumps over the lazy dog"] * 20)))

    def warmup(self) -> np.ndarray:
        """Score a tiny batch on the device, in the configured dtype and execution, and return its raw scores.

        A kernel or dtype that cannot run fails here, at load time, as a ModelLoadError naming the model and
        the cause, instead of in every request. Replicas also re-run it as a probe when a request fails for a
        reason that is not the request's: if the probe fails too, the model is broken, not the request. A model
        that shares prefixes scores the batch a second time with its prompt shared (its other kernel calls)."""
        batch = self.encoder.encode(list(self.WARMUP_PAIRS))
        raw = self._warm(batch, "")
        if self.prefix_sharing:
            from .prefix import mark_shared_prefixes

            marked = mark_shared_prefixes(self.encoder, batch, [q for q, _ in self.WARMUP_PAIRS])
            if self.shares_prefixes(marked):
                self._warm(marked, "shared-prefix ")
        return raw

    def _warm(self, batch: EncodedBatch, what: str) -> np.ndarray:
        try:
            raw = np.asarray(self.score(batch), dtype=np.float32)
        except Exception as exc:
            raise ModelLoadError(self.model_id, f"{what}warm-up forward failed ({self.execution} execution, "
                                                f"{_name(self.dtype)} on {self.device}): "
                                                f"{type(exc).__name__}: {exc}") from exc
        if raw.shape != (len(self.WARMUP_PAIRS),) or not np.isfinite(raw).all():
            raise ModelLoadError(self.model_id, f"{what}warm-up forward ({self.execution} execution, "
                                                f"{_name(self.dtype)} on {self.device}) gave scores {raw.tolist()}, "
                                                f"not {len(self.WARMUP_PAIRS)} finite numbers")
        return raw

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.model_id!r}, family={self.family!r}, dtype={self.dtype}, "
                f"device={self.device}, max_length={self.max_length}, execution={self.execution})")


def _name(dtype) -> str:
    return str(dtype).removeprefix("torch.")
