"""ModernBERT specifics: saved rope thetas honoured under transformers 5 (`fix_saved_rope`), and the last layer
at the CLS row only, for models that pool the CLS token (ettin, gte-reranker).

The head reads one row per pair, and in the last layer no row depends on another except through its keys
and values. So that layer needs keys and values of every token but queries, attention output, MLP and the
final norm of the CLS row alone: about three quarters of one layer's work saved. Measured on the ettin-17m
shape (7 layers), fp32 CPU: 1.18x the scorer's pairs/s.
Same math as transformers' `ModernBertEncoderLayer`, on fewer rows; the parity tests hold it to the
reference within 1e-5.

Padded input with SDPA (the CPU default): the layer's output is [N, 1, H]. Packed input (attention "packed",
the CUDA default) when the last layer is global (ettin-17m and -150m: every third layer, the last included):
one query row per sequence against all its keys through `attention.varlen_attention` (cu_seq_lens_q =
0..N, cu_seq_lens_k = the sequences' boundaries); the output stays [1, T, H] with the new CLS rows written in
place (other rows keep the layer's input: nothing reads them). Any other case runs the wrapped layer unchanged.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def fix_saved_rope(raw: dict) -> dict:
    """Rewrite a saved ModernBERT config so its rope thetas survive loading under transformers 5.

    Two layouts exist: `global_rope_theta`/`local_rope_theta` (transformers 4) and `layer_types` +
    `rope_parameters` per layer type (transformers 5). transformers 5 fills any theta it does not find with
    160000 (global) / 10000 (local) and ignores a single `rope_theta`, and rejects a flat `rope_parameters`.
    ettin saves 160000 for both, so we read every saved value and hand transformers explicit per-type ones.
    """
    raw = dict(raw)
    saved = raw.get("rope_parameters") or {}
    per_type = {k: dict(v) for k, v in saved.items() if k in ("full_attention", "sliding_attention")}
    flat = saved if "rope_theta" in saved else {}  # {"rope_type": ..., "rope_theta": x}: one theta for all
    single = raw.pop("rope_theta", None) or flat.get("rope_theta")
    theta_for = {"full_attention": raw.pop("global_rope_theta", None),
                 "sliding_attention": raw.pop("local_rope_theta", None)}
    if not per_type and not any(theta_for.values()) and single is None:
        return raw  # nothing saved: transformers' defaults are the model's own defaults
    for kind in ("full_attention", "sliding_attention"):
        params = per_type.get(kind) or {"rope_type": flat.get("rope_type", "default")}
        theta = params.get("rope_theta") or theta_for[kind] or single
        if theta is not None:
            params["rope_theta"] = float(theta)
        per_type[kind] = params
    raw["rope_parameters"] = per_type
    return raw


class ClsRowLastLayer(nn.Module):
    """Wraps a ModernBertEncoderLayer: [N, S, H] in, [N, 1, H] out (the CLS row) on padded SDPA input."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer
        self.attention_type = layer.attention_type  # ModernBertModel picks each layer's mask by it

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None, **kwargs) -> torch.Tensor:
        attn = self.layer.attn
        from . import attention

        if "cu_seq_lens_q" in kwargs and attn.config._attn_implementation == attention.PACKED \
                and attn.sliding_window is None and attention_mask is None and hidden_states.dim() == 3 \
                and hidden_states.shape[0] == 1:
            return self._packed_cls_rows(hidden_states, position_embeddings, kwargs)
        if "cu_seq_lens_q" in kwargs or attn.config._attn_implementation != "sdpa" or hidden_states.dim() != 3:
            return self.layer(hidden_states, attention_mask=attention_mask,
                              position_embeddings=position_embeddings, **kwargs)
        from transformers.models.modernbert.modeling_modernbert import rotate_half

        n, s, _ = hidden_states.shape
        qkv = attn.Wqkv(self.layer.attn_norm(hidden_states)).view(n, s, 3, -1, attn.head_dim)
        q = qkv[:, :1, 0].transpose(1, 2)  # [N, heads, 1, D]: the CLS query only
        k, v = qkv[:, :, 1].transpose(1, 2), qkv[:, :, 2].transpose(1, 2)
        cos, sin = (t.unsqueeze(1) for t in position_embeddings)

        def rotate(x: torch.Tensor, c: torch.Tensor, s_: torch.Tensor) -> torch.Tensor:
            # as transformers' apply_rotary_pos_emb: in fp32, then back to the input dtype
            return (x.float() * c + rotate_half(x.float()) * s_).to(x.dtype)

        q, k = rotate(q, cos[:, :, :1], sin[:, :, :1]), rotate(k, cos, sin)
        mask = None if attention_mask is None else attention_mask[:, :, :1, :]  # the CLS row of [N, 1, S, S]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.head_dim ** -0.5)
        hidden = hidden_states[:, :1] + attn.out_drop(attn.Wo(out.transpose(1, 2).reshape(n, 1, -1)))
        return hidden + self.layer.mlp(self.layer.mlp_norm(hidden))

    def _packed_cls_rows(self, hidden_states: torch.Tensor, position_embeddings, kwargs: dict) -> torch.Tensor:
        """[1, T, H] packed input of a global layer: the layer at each sequence's first row only."""
        from transformers.models.modernbert.modeling_modernbert import rotate_half

        from .attention import varlen_attention

        attn = self.layer.attn
        cu = kwargs["cu_seq_lens_q"]
        max_k = kwargs.get("max_length_q")
        first = cu[:-1].long()  # the CLS row of every sequence
        n, t = first.shape[0], hidden_states.shape[1]
        qkv = attn.Wqkv(self.layer.attn_norm(hidden_states[0])).view(t, 3, -1, attn.head_dim)
        q, k, v = qkv[first, 0], qkv[:, 1], qkv[:, 2]  # q [N, heads, D]; k, v [T, heads, D]
        cos, sin = (x[0].unsqueeze(1) for x in position_embeddings)  # [T, 1, D]

        def rotate(x: torch.Tensor, c: torch.Tensor, s_: torch.Tensor) -> torch.Tensor:
            # as transformers' apply_rotary_pos_emb: in fp32, then back to the input dtype
            return (x.float() * c + rotate_half(x.float()) * s_).to(x.dtype)

        q, k = rotate(q, cos[first], sin[first]), rotate(k, cos, sin)
        cu_q = torch.arange(n + 1, dtype=torch.int32, device=cu.device)  # one query per sequence
        out = varlen_attention(q, k, v, cu_q, 1, cu.to(torch.int32), None if max_k is None else int(max_k),
                               scale=attn.head_dim ** -0.5)
        rows = hidden_states[0, first] + attn.out_drop(attn.Wo(out.reshape(n, -1)))
        rows = rows + self.layer.mlp(self.layer.mlp_norm(rows))
        return hidden_states.index_copy(1, first, rows.unsqueeze(0))


def cls_only_last_layer(model: nn.Module) -> bool:
    """Compute a ModernBertModel's last layer at the CLS row only (its output becomes [N, 1, H]).

    Only for callers that read nothing but `last_hidden_state[:, 0]` (padded) or each sequence's first row
    (packed). True when installed (or already there).
    """
    from transformers import ModernBertModel

    if not isinstance(model, ModernBertModel):
        return False
    if not isinstance(model.layers[-1], ClsRowLastLayer):
        model.layers[-1] = ClsRowLastLayer(model.layers[-1])
    return True
