"""Packed (unpadded) model inputs: a batch of sequences as ONE row of real tokens with per-sequence boundaries.

Embeddings, MLPs and norms then never touch padding; attention keeps the sequences apart through
`cu_seq_lens` (see models/attention.py). Pooling reads only the rows it needs (first / last token of each
sequence) or reduces each segment with one vectorised op — no Python loop per sequence.

    packed = pack(batch, indices)                    # PackedInputs, on the CPU
    packed = packed.to("cuda", non_blocking=True)    # from pinned memory when pin_memory=True
    hidden = model(**packed.model_kwargs()).last_hidden_state   # [1, T, H], attn implementation "packed"
    rows = first_token(hidden, packed.cu_seq_lens)   # [N, H]: CLS of each sequence
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Sequence

import numpy as np
import torch

from .encoded import EncodedBatch


# Base models verified to run packed (tests/models/test_attention.py, test_packed_scoring.py): their forward passes
# position_ids and the cu_seq_lens kwargs through to transformers' AttentionInterface. Value: how the first
# position id of a sequence is found.
_PACKED_MODEL_TYPES = {"modernbert": "zero", "bert": "zero", "qwen3": "zero", "xlm-roberta": "pad_plus_one",
                       "qwen2": "zero", "gemma": "zero"}


def packed_position_offset(config) -> int | None:
    """First position id of every packed sequence for this base model, or None when it cannot run packed."""
    rule = _PACKED_MODEL_TYPES.get(getattr(config, "model_type", None))
    if rule is None:
        return None
    return (config.pad_token_id or 0) + 1 if rule == "pad_plus_one" else 0


@dataclass
class PackedInputs:
    input_ids: torch.Tensor  # [1, T] long: all sequences back to back
    position_ids: torch.Tensor  # [1, T] long: restarts at `position_offset` for every sequence
    cu_seq_lens: torch.Tensor  # [N + 1] int32: sequence i is tokens cu[i]:cu[i+1]
    max_length: int  # longest sequence, what variable-length kernels size their tiles by
    token_type_ids: torch.Tensor | None = None  # [1, T] long, for models with token types (BERT)
    lengths: np.ndarray = field(default=None, repr=False)  # int64 [N], host copy: no device sync to read it

    def __len__(self) -> int:
        return int(self.cu_seq_lens.shape[0]) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[1])

    def model_kwargs(self) -> dict:
        """Keyword arguments for a transformers base model whose attention implementation is "packed".

        The `cu_seq_lens_*` / `max_length_*` names are the ones transformers forwards to every attention call
        (TransformersKwargs), so its own `flash_attention_2` accepts the same inputs.
        """
        kwargs = {
            "input_ids": self.input_ids,
            "position_ids": self.position_ids,
            "cu_seq_lens_q": self.cu_seq_lens,
            "cu_seq_lens_k": self.cu_seq_lens,
            "max_length_q": self.max_length,
            "max_length_k": self.max_length,
        }
        if self.token_type_ids is not None:
            kwargs["token_type_ids"] = self.token_type_ids
        return kwargs

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "PackedInputs":
        move = lambda t: None if t is None else t.to(device, non_blocking=non_blocking)  # noqa: E731
        return replace(self, input_ids=move(self.input_ids), position_ids=move(self.position_ids),
                       cu_seq_lens=move(self.cu_seq_lens), token_type_ids=move(self.token_type_ids))


def pack(batch: EncodedBatch, indices: Sequence[int] | np.ndarray | None = None, *, position_offset: int = 0,
         with_token_types: bool | None = None, pin_memory: bool = False) -> PackedInputs:
    """Pack sequences `indices` of `batch` (all, in order, when None) into one row.

    position_offset: first position id of every sequence; 0 for BERT / ModernBERT / Qwen3, pad_token_id + 1 for
    RoBERTa / XLM-R (whose embeddings number real tokens from there).
    with_token_types: include token_type_ids (default: when the batch carries them).
    pin_memory: page-lock the host tensors so a later `.to("cuda", non_blocking=True)` overlaps compute
    (ignored without CUDA, where pinning is impossible).
    """
    chunk = batch if indices is None else batch.select(indices)
    ids = chunk.input_ids[chunk.offsets[0]:chunk.offsets[-1]]
    lengths = chunk.lengths
    if len(lengths) == 0:
        raise ValueError("cannot pack an empty batch")
    if lengths.min() <= 0:
        raise ValueError("cannot pack an empty sequence: every sequence needs at least one token")
    total = int(lengths.sum())
    positions = concat_positions(lengths, position_offset)
    pin_memory = pin_memory and torch.cuda.is_available()
    cu = cumulative(lengths)

    def tensor(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(a)).to(dtype)
        return t.pin_memory() if pin_memory else t

    if with_token_types is None:
        with_token_types = chunk.token_type_ids is not None
    types = None
    if with_token_types:
        raw = chunk.token_type_ids[chunk.offsets[0]:chunk.offsets[-1]] if chunk.token_type_ids is not None \
            else np.zeros(total, dtype=np.int8)
        types = tensor(raw, torch.long).view(1, -1)
    return PackedInputs(
        input_ids=tensor(ids, torch.long).view(1, -1),
        position_ids=tensor(positions, torch.long).view(1, -1),
        cu_seq_lens=tensor(cu, torch.int32),
        max_length=int(lengths.max()),
        token_type_ids=types,
        lengths=lengths.astype(np.int64),
    )


def cumulative(lengths: np.ndarray) -> np.ndarray:
    """[0, l0, l0+l1, ...]: where each of the concatenated sequences starts, and the total last (int64)."""
    out = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=out[1:])
    return out


def concat_positions(lengths: np.ndarray, first) -> np.ndarray:
    """Concatenated position ids: sequence i counts from first[i] (a scalar: the same for all) for lengths[i]."""
    starts = np.repeat(cumulative(lengths)[:-1], lengths)
    return np.arange(int(lengths.sum())) - starts + np.repeat(np.broadcast_to(first, lengths.shape), lengths)


# --- reading rows back out of packed hidden states ([1, T, H] or [T, H]) ------------------------------------

def _flat(hidden: torch.Tensor) -> torch.Tensor:
    if hidden.dim() == 3:
        if hidden.shape[0] != 1:
            raise ValueError(f"packed hidden states have batch size 1, got shape {tuple(hidden.shape)}")
        return hidden[0]
    return hidden


def first_token(hidden: torch.Tensor, cu_seq_lens: torch.Tensor) -> torch.Tensor:
    """[N, H]: the first token of each sequence (CLS pooling)."""
    return _flat(hidden).index_select(0, cu_seq_lens[:-1].long())


def last_token(hidden: torch.Tensor, cu_seq_lens: torch.Tensor) -> torch.Tensor:
    """[N, H]: the last token of each sequence (last-token pooling, causal LM scoring)."""
    return _flat(hidden).index_select(0, cu_seq_lens[1:].long() - 1)


def segment_ids(cu_seq_lens: torch.Tensor, num_tokens: int | None = None) -> torch.Tensor:
    """[T] long: the sequence index of every packed token."""
    lengths = (cu_seq_lens[1:] - cu_seq_lens[:-1]).long()
    n = lengths.shape[0]
    total = int(num_tokens) if num_tokens is not None else None
    return torch.repeat_interleave(torch.arange(n, device=cu_seq_lens.device), lengths, output_size=total)


def segment_mean(hidden: torch.Tensor, cu_seq_lens: torch.Tensor) -> torch.Tensor:
    """[N, H]: the mean over each sequence's tokens (mean pooling without a padding mask)."""
    flat = _flat(hidden)
    n = cu_seq_lens.shape[0] - 1
    seg = segment_ids(cu_seq_lens, flat.shape[0])
    sums = flat.new_zeros(n, flat.shape[1]).index_add_(0, seg, flat)
    counts = (cu_seq_lens[1:] - cu_seq_lens[:-1]).to(flat.dtype).unsqueeze(1)
    return sums / counts


def segment_max(hidden: torch.Tensor, cu_seq_lens: torch.Tensor) -> torch.Tensor:
    """[N, H]: the elementwise max over each sequence's tokens (max pooling)."""
    flat = _flat(hidden)
    n = cu_seq_lens.shape[0] - 1
    seg = segment_ids(cu_seq_lens, flat.shape[0]).unsqueeze(1).expand_as(flat)
    out = flat.new_full((n, flat.shape[1]), float("-inf"))
    return out.scatter_reduce_(0, seg, flat, reduce="amax", include_self=True)


def unpack(hidden: torch.Tensor, lengths: Sequence[int] | np.ndarray) -> list[torch.Tensor]:
    """Per-sequence views [L_i, H] (for tests and debugging; not for the hot path)."""
    return list(torch.split(_flat(hidden), [int(x) for x in lengths]))
