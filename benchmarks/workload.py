"""Natural-questions-like workloads with controlled token counts, and the real model shapes.

Token counts, not texts, decide the speed of a reranker, so the workload fixes the count of every query and
passage: short queries (8-16 tokens), passages mostly 60-200 tokens with a tail to ~500, pairs <= 512 tokens.
Texts are made of words that the benchmark tokenizer (trained here) maps to exactly one token each.
"""
from __future__ import annotations

import numpy as np

QUERY_TOKENS = (8, 16)
PASSAGE_BODY = (60, 200)
PASSAGE_TAIL = (200, 490)
TAIL_SHARE = 0.12
MAX_LENGTH = 512


def nq_like_lengths(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(query_tokens, passage_tokens), int64 [n] each."""
    rng = np.random.default_rng(seed)
    queries = rng.integers(QUERY_TOKENS[0], QUERY_TOKENS[1] + 1, n)
    body = rng.integers(PASSAGE_BODY[0], PASSAGE_BODY[1] + 1, n)
    # the tail thins out towards its end, as real passage lengths do
    tail = PASSAGE_TAIL[0] + np.minimum(rng.exponential(90.0, n), PASSAGE_TAIL[1] - PASSAGE_TAIL[0]).astype(np.int64)
    passages = np.where(rng.random(n) < TAIL_SHARE, tail, body)
    return queries.astype(np.int64), passages.astype(np.int64)


def pair_token_ids(n: int, seed: int = 0, *, vocab_size: int = 50368, cls_id: int = 50281,
                   sep_id: int = 50282) -> list[list[int]]:
    """ModernBERT-style [CLS] query [SEP] passage [SEP] id lists of NQ-like lengths (for model-only timing)."""
    q, p = nq_like_lengths(n, seed)
    rng = np.random.default_rng(seed + 1)
    out = []
    for nq, np_ in zip(q, p):
        body = rng.integers(1000, vocab_size - 1000, nq + np_).tolist()
        out.append([cls_id, *body[:nq], sep_id, *body[nq:], sep_id])
    return out


# The real configurations (REFERENCE.md section 2; Qwen3-Reranker-0.6B's config.json).
ETTIN = {
    "ettin-17m": dict(hidden_size=256, intermediate_size=384, num_hidden_layers=7, num_attention_heads=4),
    "ettin-150m": dict(hidden_size=768, intermediate_size=1152, num_hidden_layers=22, num_attention_heads=12),
}
QWEN3_06B = dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                 num_key_value_heads=8, head_dim=128, vocab_size=151669, tie_word_embeddings=True,
                 max_position_embeddings=40960, rope_theta=1000000.0, rms_norm_eps=1e-6)
# jina-reranker-v3's config.json: the same backbone, the full Qwen3 vocabulary, 131072 positions.
JINA_V3_06B = {**QWEN3_06B, "vocab_size": 151936, "max_position_embeddings": 131072}


# Small models in the real layouts, for the multi-model benchmark (benchmarks/multi_model.py): name -> (kind, shape
# overrides of the real configuration above, seed). Kinds: "modular" (ettin's modular cross-encoder layout),
# "bert" / "modernbert" (*ForSequenceClassification), "qwen3" (Qwen3-Reranker's layout).
TINY_MODELS = {
    "modular-1": ("modular", dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=2), 11),
    "modular-2": ("modular", dict(hidden_size=48, intermediate_size=72, num_hidden_layers=2, num_attention_heads=2), 12),
    "modular-3": ("modular", dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2), 13),
    "seq-cls-bert-1": ("bert", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
                       21),
    "seq-cls-bert-2": ("bert", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2),
                       22),
    "seq-cls-modernbert": ("modernbert", dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                              num_attention_heads=2), 23),
    "qwen3-1": ("qwen3", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              num_key_value_heads=1, head_dim=16, max_position_embeddings=1024), 31),
    "qwen3-2": ("qwen3", dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
                              num_key_value_heads=1, head_dim=24, max_position_embeddings=1024), 32),
}

# A Qwen3 small enough for a 2-core CPU (~10M parameters besides the embedding, 100 NQ-like pairs in a few seconds):
# Qwen3-Reranker-0.6B's layout (grouped KV heads, head_dim 64 here, tied embeddings, the real vocabulary) at 3/8 of
# the width, 6 layers.
QWEN3_SMALL = dict(QWEN3_06B, hidden_size=384, intermediate_size=1152, num_hidden_layers=6, num_attention_heads=6,
                   num_key_value_heads=2, head_dim=64)

# Shared-prefix workload (benchmarks/shared_prefix.py): a 20-word task instruction and a 12-word query, as in the
# issue's estimate of a Qwen3-Reranker request's prefix share.
INSTRUCTION_WORDS = 20
SHARED_QUERY_WORDS = 12


def rerank_request(vocab: list[str], n_docs: int, seed: int = 0) -> tuple[str, str, list[str]]:
    """(query, instruction, documents) of one rerank request: NQ-like passage lengths, words of `vocab` (one
    benchmark token each)."""
    rng = np.random.default_rng(seed)
    pick = lambda k: " ".join(vocab[i] for i in rng.integers(0, len(vocab), k))  # noqa: E731
    _, passages = nq_like_lengths(n_docs, seed)
    return pick(SHARED_QUERY_WORDS), pick(INSTRUCTION_WORDS), [pick(int(k)) for k in passages]


def ettin_config(name: str, **overrides):
    """A ModernBertConfig with ettin's real shape: vocab 50368, head_dim 64, every 3rd layer global, the rest a
    +-64 window (local_attention 128), rope theta 160000 for global AND local layers."""
    from transformers import ModernBertConfig
    kwargs = dict(vocab_size=50368, max_position_embeddings=7999, global_attn_every_n_layers=3, local_attention=128,
                  pad_token_id=50283, bos_token_id=50281, eos_token_id=50282, cls_token_id=50281, sep_token_id=50282,
                  norm_bias=False, attention_bias=False, mlp_bias=False, **ETTIN[name])
    cfg = ModernBertConfig(**{**kwargs, **overrides})
    cfg.rope_parameters = {"full_attention": {"rope_type": "default", "rope_theta": 160000.0},
                           "sliding_attention": {"rope_type": "default", "rope_theta": 160000.0}}
    return cfg
