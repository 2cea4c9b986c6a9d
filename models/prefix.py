"""Shared-prefix scoring (docs/API.md): the tokens every pair of a request starts with run once, not once per pair.

Causal attention makes a prefix's keys and values independent of what follows it, so a sequence's own tokens,
at positions continuing after the prefix and attending to the prefix's keys and values, give exactly the
pairwise result. Two halves:

Ingress (`mark_shared_prefixes`): the split is decided from token ids. Sequences keep ALL their tokens (what
pairwise scoring sees); for the sequences of each query, the template's tokens before the document
(`Encoder.document_slot(...).before`, which every causal family describes for long documents) are the
candidate prefix. Each sequence agrees with it on some leading tokens; the prefix length that saves the most
tokens wins, and the sequences that start with those tokens are marked with it. Whatever does not start with
them is left unmarked and scored pairwise: a tokenizer merge across the boundary, a left truncation or a
truncation that cut into the prompt, another query or instruction. A mark is a statement about token ids
only, so it can never make a score differ from pairwise scoring.

Replica (`SharedPrefixInputs`, `shared_last_hidden`): per forward chunk, sequences marked with the same tokens
form a group (EncodedBatch.prefix_groups); the chunk's distinct prefixes run in a first forward whose keys and
values per layer are kept (`PrefixCache`), then every sequence's own part runs with its positions offset and
attends to its group's prefix (a sequence of no group attends to an empty one):
- packed (CUDA fp16/bf16, and CPU where the base model runs packed: `Scorer.shared_packed`): prefixes and own
  parts each one row of real tokens; each sequence's keys are its prefix's then its own tokens, gathered back to
  back, and the varlen kernel (on CPU: one SDPA per sequence) gets separate query and key lengths.
- padded (base models that do not run packed, fp32 on CUDA): the prefixes padded [G, P], then the own parts
  padded [N, S]; each row's keys are its prefix's slots then its own, under an explicit mask (causal, padding,
  sliding windows from positions). Causal attention with fewer queries than keys is bottom-right aligned in flash-attn 2 and in torch's
  `varlen_attn` (aten's flash forward; PyTorch's SDPA refuses that shape for flash for this very reason), i.e.
  the queries are the LAST positions: exactly an own part after its prefix. models/attention.py's per-segment
  fallback follows the same rule.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, fields, replace
from typing import Callable, Sequence

import numpy as np
import torch

from .encoded import EncodedBatch
from .packing import concat_positions, cumulative

SETTINGS = ("auto", "off")
_ALL = 1 << 62  # "keep every query token" (document_slot's query cut)
# Base models whose forward was verified to take the prefix's keys and values through the cache's `update`, explicit
# position ids and a prepared 4-D (or per-layer-type) mask (tests/models/test_shared_prefix.py).
MODEL_TYPES = frozenset({"qwen3", "qwen2", "gemma", "gemma2"})
_MASK_FORMATS = {"sdpa": "bool", "packed": "bool", "eager": "additive"}


def check_setting(value: str) -> str:
    if value not in SETTINGS:
        raise ValueError(f"shared_prefix must be one of {SETTINGS}, got {value!r}")
    return value


# --- the ingress: which leading tokens each sequence shares -------------------------------------------------------

def agreement(batch: EncodedBatch, rows: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """For each row, how many leading tokens it has in common with `candidate`, at most its length - 1 (a
    sequence keeps at least its last token: the score is read there)."""
    width = len(candidate)
    if width == 0 or len(rows) == 0:
        return np.zeros(len(rows), dtype=np.int64)
    starts, lengths = batch.offsets[rows], batch.lengths[rows]
    at = np.minimum(starts[:, None] + np.arange(width)[None, :], len(batch.input_ids) - 1)
    same = (batch.input_ids[at] == candidate[None, :]) & (np.arange(width)[None, :] < (lengths - 1)[:, None])
    return np.where(same.all(axis=1), width, same.argmin(axis=1)).astype(np.int64)


def best_length(common: np.ndarray) -> int:
    """The prefix length that saves the most tokens, given each sequence's agreement with the candidate: length
    × (sequences that have it − 1), 0 when nothing is saved; of equal savings the longer prefix."""
    values = np.unique(common[common > 0])
    if not len(values):
        return 0
    having = len(common) - np.searchsorted(np.sort(common), values, side="left")
    saved = values * (having - 1)
    best = len(saved) - 1 - int(np.argmax(saved[::-1]))
    return int(values[best]) if saved[best] > 0 else 0


def mark_shared_prefixes(encoder, batch: EncodedBatch, queries: Sequence[str], instruction: str | None = None, *,
                         window_query_tokens: int | None = None) -> EncodedBatch:
    """`batch` with the prefix marks of its sequences (see the module docstring); `queries[i]` is sequence i's
    query. `window_query_tokens`: the batch holds long-document windows (docs/API.md), built around the query cut
    to that many tokens, whose template is a second candidate. Only the marks change: ids, lengths and token
    counts stay those of pairwise scoring."""
    from .errors import InputError

    if len(queries) != len(batch):
        raise ValueError(f"{len(queries)} queries for {len(batch)} sequences")
    rows_of: dict[str, list[int]] = {}
    for i, query in enumerate(queries):
        rows_of.setdefault(query, []).append(i)
    marks = np.zeros(len(batch), dtype=np.int32)
    for query, rows in rows_of.items():
        if len(rows) < 2:
            continue  # nothing to share
        try:
            candidates = [encoder.document_slot(query, _ALL, instruction).before]
            if window_query_tokens is not None:
                candidates.append(encoder.document_slot(query, window_query_tokens, instruction).before)
        except InputError:  # a template the family cannot split at the document: these pairs go pairwise
            continue
        left = np.asarray(rows, dtype=np.int64)
        for candidate in candidates:
            if len(left) < 2:
                break
            common = agreement(batch, left, np.asarray(candidate, dtype=batch.input_ids.dtype))
            length = best_length(common)
            if length:
                marks[left[common >= length]] = length
                left = left[common < length]
    return batch.with_prefix_lengths(marks) if marks.any() else batch


def encode_marked(encoder, encode: Callable, items: Sequence[tuple[str, str | None]], **kwargs):
    """`encode(items, **kwargs)` with the request's shared prefixes marked: `encode` is the encoder's own `encode`
    (an EncodedBatch comes back) or models.windows.encode_windows for it (a WindowedBatch, whose windows are
    sequences of their item's query)."""
    from .windows import WindowedBatch, window_query_tokens

    encoded = encode(items, **kwargs)
    queries = [query for query, _ in items]
    instruction = kwargs.get("instruction")
    if not isinstance(encoded, WindowedBatch):
        return mark_shared_prefixes(encoder, encoded, queries, instruction)
    per_sequence = [query for query, count in zip(queries, encoded.counts.tolist()) for _ in range(count)]
    tokens = window_query_tokens(encoder.max_length) if encoded.chunked.any() else None
    return replace(encoded, batch=mark_shared_prefixes(encoder, encoded.batch, per_sequence, instruction,
                                                       window_query_tokens=tokens))


# --- the replica: one chunk's inputs -------------------------------------------------------------------------------

@dataclass
class SharedPrefixInputs:
    """One forward chunk of sequences in groups sharing a prefix (host tensors until moved).

    Padded: prefix_ids [G, P] (right-padded), own_ids / own_positions [N, S]; the masks are built on the device
    from the lengths. Packed: prefix_ids / prefix_positions [1, ΣP] with prefix_cu [G+1]; own_ids / own_positions
    [1, T] with own_cu [N+1]; key_cu [N+1] bounds each sequence's keys (its prefix's, then its own) and `gather`
    [Σ keys] picks them from the prefix rows followed by the own rows."""

    packed: bool
    prefix_ids: torch.Tensor
    prefix_positions: torch.Tensor
    own_ids: torch.Tensor
    own_positions: torch.Tensor
    prefix_lengths: torch.Tensor  # [G]
    row_prefix: torch.Tensor  # [N]: the prefix length of each sequence's keys (0: a sequence of no group)
    row_group: torch.Tensor  # [N]: its group (0 for one of none: its prefix is masked out entirely)
    own_lengths: torch.Tensor  # [N]
    max_prefix: int
    max_own: int
    prefix_cu: torch.Tensor | None = None
    own_cu: torch.Tensor | None = None
    key_cu: torch.Tensor | None = None
    gather: torch.Tensor | None = None
    max_keys: int = 0

    def __len__(self) -> int:
        return int(self.row_prefix.shape[0])

    def tensors(self) -> list[torch.Tensor]:
        return [v for f in fields(self) if isinstance(v := getattr(self, f.name), torch.Tensor)]

    def map_tensors(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "SharedPrefixInputs":
        return replace(self, **{f.name: fn(v) for f in fields(self) if isinstance(v := getattr(self, f.name),
                                                                                   torch.Tensor)})

    def to(self, device, non_blocking: bool = False) -> "SharedPrefixInputs":
        return self.map_tensors(lambda t: t.to(device, non_blocking=non_blocking))


def chunk_groups(batch: EncodedBatch, index: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(group of each chunk row, -1 for none; prefix length and one member of each group) over this chunk only:
    a group needs two members IN the chunk (alone, a sequence runs whole: sharing would save nothing)."""
    group_all, prefix_all, first_all = batch.prefix_groups
    group = group_all[index]
    present, counts = np.unique(group[group >= 0], return_counts=True)
    kept = present[counts > 1]
    renumber = np.full(len(prefix_all) + 1, -1, dtype=np.int64)
    renumber[kept] = np.arange(len(kept))
    return renumber[group], prefix_all[kept], first_all[kept]


def shared_inputs(batch: EncodedBatch, index: np.ndarray, *, packed: bool, pad_id: int,
                  pin_memory: bool = False) -> SharedPrefixInputs | None:
    """The inputs of one chunk (`index`: its sequences), None when no two of them share a prefix."""
    group, prefix, first = chunk_groups(batch, index)
    if not len(prefix):
        return None
    ids, starts, lengths = batch.input_ids, batch.offsets[index], batch.lengths[index]
    row_prefix = np.where(group >= 0, prefix[np.maximum(group, 0)], 0)
    own = lengths - row_prefix
    pin = pin_memory and torch.cuda.is_available()

    def tensor(a: np.ndarray, dtype=torch.long) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(a)).to(dtype)
        return t.pin_memory() if pin else t

    common = dict(prefix_lengths=tensor(prefix), row_prefix=tensor(row_prefix), row_group=tensor(np.maximum(group, 0)),
                  own_lengths=tensor(own), max_prefix=int(prefix.max()), max_own=int(own.max()))
    prefix_rows = [ids[batch.offsets[m]:batch.offsets[m] + p] for m, p in zip(first, prefix)]
    own_rows = [ids[s + p:s + n] for s, p, n in zip(starts, row_prefix, lengths)]
    if not packed:
        prefix_ids = np.full((len(prefix), int(prefix.max())), pad_id, dtype=np.int64)
        for r, row in enumerate(prefix_rows):
            prefix_ids[r, :len(row)] = row
        own_ids = np.full((len(index), int(own.max())), pad_id, dtype=np.int64)
        for r, row in enumerate(own_rows):
            own_ids[r, :len(row)] = row
        own_positions = row_prefix[:, None] + np.arange(own_ids.shape[1])[None, :]
        prefix_positions = np.tile(np.arange(prefix_ids.shape[1]), (len(prefix), 1))
        return SharedPrefixInputs(False, tensor(prefix_ids), tensor(prefix_positions), tensor(own_ids),
                                  tensor(own_positions), **common)
    prefix_cu, own_cu = cumulative(prefix), cumulative(own)
    keys = row_prefix + own
    # Each sequence's keys: its group's prefix rows (of the prefix forward), then its own rows, which follow
    # all prefix rows in the joined [prefix rows | own rows] tensor the cache builds per layer.
    prefix_at = np.where(group >= 0, prefix_cu[np.maximum(group, 0)], 0)
    gather = np.concatenate([np.concatenate([np.arange(a, a + p), prefix_cu[-1] + np.arange(o, o + n)])
                             for a, p, o, n in zip(prefix_at, row_prefix, own_cu[:-1], own)])
    return SharedPrefixInputs(
        True, tensor(np.concatenate(prefix_rows)).view(1, -1), tensor(concat_positions(prefix, 0)).view(1, -1),
        tensor(np.concatenate(own_rows)).view(1, -1), tensor(concat_positions(own, row_prefix)).view(1, -1),
        prefix_cu=tensor(prefix_cu, torch.int32), own_cu=tensor(own_cu, torch.int32),
        key_cu=tensor(cumulative(keys), torch.int32), gather=tensor(gather), max_keys=int(keys.max()), **common)


# --- the replica: the two forwards --------------------------------------------------------------------------------

class PrefixCache:
    """What a transformers decoder calls as its cache, for the two forwards of a chunk: in the prefix forward it
    keeps each layer's keys and values; in the own-part forward it returns them joined with the own tokens' (by
    `join`), keeping nothing, so no layer's joined keys outlive its attention. Masks are always given to the model
    (or, packed, none is needed), so the sizes transformers' mask preparation asks of a cache are never used."""

    def __init__(self):
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.join: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if self.join is None:
            self.keys[layer_idx], self.values[layer_idx] = key_states, value_states
            return key_states, value_states
        return self.join(self.keys[layer_idx], key_states), self.join(self.values[layer_idx], value_states)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return 0

    def get_mask_sizes(self, query_length, layer_idx: int = 0):
        return query_length, 0


def cache_keyword(model) -> str | None:
    """The name under which the model's forward takes a cache ("cache" in transformers >= 5.24)."""
    params = inspect.signature(model.forward).parameters
    return next((name for name in ("cache", "past_key_values") if name in params), None)


def unsupported_reason(model) -> str | None:
    """Why this loaded base model cannot share prefixes exactly (None: it can)."""
    config = model.config
    if config.model_type not in MODEL_TYPES:
        return f"base model type {config.model_type!r} is not one verified for shared prefixes ({sorted(MODEL_TYPES)})"
    if config._attn_implementation not in _MASK_FORMATS:
        return f"attention implementation {config._attn_implementation!r} takes no prepared mask"
    if cache_keyword(model) is None:
        return "its forward takes no cache"
    return None


def _sliding_window(config) -> int | None:
    """The window of the model's sliding layers, None when it has none."""
    if "sliding_attention" not in (getattr(config, "layer_types", None) or ()):
        return None
    return getattr(config, "sliding_window", None)


def _masks(config, query_positions, key_positions, key_valid, dtype):
    """The attention mask(s) of a padded forward: query [B, Sq] attends key [B, K] where the key is real, not after
    it, and (sliding layers) within the window; per layer type when the model has sliding layers."""
    keep = key_valid[:, None, :] & (key_positions[:, None, :] <= query_positions[:, :, None])
    window = _sliding_window(config)
    masks = {"full_attention": keep}
    if window is not None:  # transformers' rule: key kept when q - k < window
        masks["sliding_attention"] = keep & (query_positions[:, :, None] - key_positions[:, None, :] < window)
    if _MASK_FORMATS[config._attn_implementation] == "additive":
        low = torch.finfo(dtype).min
        masks = {k: torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill_(~m, low) for k, m in masks.items()}
    masks = {k: m[:, None] for k, m in masks.items()}  # [B, 1, Sq, K]
    return masks if window is not None else masks["full_attention"]


def shared_last_hidden(model, inputs: SharedPrefixInputs) -> torch.Tensor:
    """[N, H]: the base model's final hidden state at each sequence's last token, the prefixes run once."""
    cache, keyword = PrefixCache(), cache_keyword(model)
    if inputs.packed:
        return _packed(model, inputs, cache, keyword)
    device, dtype = inputs.own_ids.device, model.dtype
    config = model.config
    prefix_pos = inputs.prefix_positions
    slots = torch.arange(inputs.max_prefix, device=device)
    prefix_valid = slots[None, :] < inputs.prefix_lengths[:, None]
    model(input_ids=inputs.prefix_ids, position_ids=prefix_pos, use_cache=True, **{keyword: cache},
          attention_mask=_masks(config, prefix_pos, prefix_pos, prefix_valid, dtype))
    # Row r's keys: its group's prefix slots (kept where < its prefix length), then its own tokens. One prefix
    # (the common case: one request) is broadcast, not gathered: the concatenation is then the only copy.
    if inputs.prefix_ids.shape[0] == 1:
        cache.join = lambda past, new: torch.cat([past.expand(new.shape[0], -1, -1, -1), new], dim=2)
    else:
        cache.join = lambda past, new: torch.cat([past.index_select(0, inputs.row_group), new], dim=2)
    own_slots = torch.arange(inputs.max_own, device=device)
    key_valid = torch.cat([slots[None, :] < inputs.row_prefix[:, None],
                           own_slots[None, :] < inputs.own_lengths[:, None]], dim=1)
    key_positions = torch.cat([slots[None, :].expand(len(inputs), -1), inputs.own_positions], dim=1)
    hidden = model(input_ids=inputs.own_ids, position_ids=inputs.own_positions, use_cache=True, **{keyword: cache},
                   attention_mask=_masks(config, inputs.own_positions, key_positions, key_valid, dtype)
                   ).last_hidden_state
    return hidden[torch.arange(hidden.shape[0], device=device), inputs.own_lengths - 1]


def _packed(model, inputs: SharedPrefixInputs, cache: PrefixCache, keyword: str) -> torch.Tensor:
    """The packed pair of forwards (attention implementation "packed", models/attention.py)."""
    from .packing import last_token

    model(input_ids=inputs.prefix_ids, position_ids=inputs.prefix_positions, use_cache=True, **{keyword: cache},
          cu_seq_lens_q=inputs.prefix_cu, cu_seq_lens_k=inputs.prefix_cu, max_length_q=inputs.max_prefix,
          max_length_k=inputs.max_prefix)
    cache.join = lambda past, new: torch.cat([past, new], dim=2).index_select(2, inputs.gather)
    hidden = model(input_ids=inputs.own_ids, position_ids=inputs.own_positions, use_cache=True, **{keyword: cache},
                   cu_seq_lens_q=inputs.own_cu, cu_seq_lens_k=inputs.key_cu, max_length_q=inputs.max_own,
                   max_length_k=inputs.max_keys).last_hidden_state
    return last_token(hidden, inputs.own_cu)
