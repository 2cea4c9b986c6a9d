"""Reference scores (docs/API.md, Scores), computed in the test process with the reference libraries."""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

QWEN_PREFIX = ("<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the "
               "Instruct provided. Note that the answer can only be \"yes\" or \"no\".<|im_end|>\n"
               "<|im_start|>user\n")
QWEN_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
QWEN_DEFAULT_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"


@lru_cache(maxsize=None)
def _cross_encoder(path: str):
    from sentence_transformers import CrossEncoder
    return CrossEncoder(path, device="cpu")


def cross_encoder_raw(path, pairs) -> np.ndarray:
    """sentence-transformers CrossEncoder with an Identity activation: the raw score of docs/API.md, Scores."""
    ce = _cross_encoder(str(path))
    return np.asarray(ce.predict([list(p) for p in pairs], activation_fn=torch.nn.Identity(),
                                 convert_to_numpy=True), dtype=np.float64)


@lru_cache(maxsize=None)
def _tokenizer(path: str):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(path)


def pair_ids(path, query: str, doc: str | None) -> list[int]:
    """The ids the reference tokenizer gives a (query, doc) pair with longest_first truncation."""
    tok = _tokenizer(str(path))
    return tok(query, doc, truncation="longest_first")["input_ids"]


@lru_cache(maxsize=None)
def _seq_cls(path: str):
    from transformers import AutoModelForSequenceClassification
    return AutoModelForSequenceClassification.from_pretrained(path).eval()


def seq_cls_single_raw(path, texts) -> np.ndarray:
    """logits[:, 0] of a *ForSequenceClassification on single texts (no pair), one at a time."""
    tok, model = _tokenizer(str(path)), _seq_cls(str(path))
    out = []
    with torch.no_grad():
        for t in texts:
            out.append(float(model(**tok(t, truncation=True, return_tensors="pt")).logits[0, 0]))
    return np.array(out)


@lru_cache(maxsize=None)
def _causal_lm(path: str):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def qwen_ids(path, query: str, doc: str, instruction: str | None = None) -> list[int]:
    """The official Qwen3-Reranker input: prefix tokens + formatted content tokens + suffix tokens."""
    tok = _tokenizer(str(path))
    content = f"<Instruct>: {instruction or QWEN_DEFAULT_INSTRUCTION}\n<Query>: {query}\n<Document>: {doc}"
    return (tok.encode(QWEN_PREFIX, add_special_tokens=False) + tok.encode(content, add_special_tokens=False)
            + tok.encode(QWEN_SUFFIX, add_special_tokens=False))


def qwen_raw(path, pairs, instruction: str | None = None) -> np.ndarray:
    """logit("yes") - logit("no") at the last position (sigmoid of it = the official softmax score)."""
    tok, model = _tokenizer(str(path)), _causal_lm(str(path))
    yes, no = tok.convert_tokens_to_ids("yes"), tok.convert_tokens_to_ids("no")
    out = []
    with torch.no_grad():
        for q, d in pairs:
            logits = model(torch.tensor([qwen_ids(path, q, d, instruction)])).logits[0, -1]
            out.append(float(logits[yes] - logits[no]))
    return np.array(out)


def sigmoid(x) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))
