"""The benchmark workload: NQ-like token counts, exact under the benchmark tokenizers."""
from __future__ import annotations

import numpy as np

from benchmarks import build, run, workload


def test_lengths_follow_the_nq_like_shape():
    q, p = workload.nq_like_lengths(4000, seed=3)
    assert q.min() >= 8 and q.max() <= 16
    share_body = np.mean((p >= 60) & (p <= 200))
    assert 0.8 < share_body < 0.95  # mostly 60-200 tokens
    assert p.max() > 400  # a tail towards 512
    assert (q + p + 3).max() <= workload.MAX_LENGTH


def test_every_pair_tokenizes_to_its_planned_count():
    tok = build.modernbert_tokenizer()
    q_len, p_len = workload.nq_like_lengths(40, seed=0)
    pairs = run.make_pairs(40, seed=0)
    counts = [len(ids) for ids in tok([q for q, _ in pairs], [d for _, d in pairs])["input_ids"]]
    assert counts == (q_len + p_len + 3).tolist()  # [CLS] q [SEP] p [SEP]


def test_qwen_tokenizer_has_single_yes_no_tokens_and_exact_counts():
    tok = build.qwen_tokenizer()
    yes, no = tok.convert_tokens_to_ids(["yes", "no"])
    assert yes != tok.unk_token_id and no != tok.unk_token_id and yes != no
    pairs = run.make_pairs(5, seed=1)
    q_len, p_len = workload.nq_like_lengths(5, seed=1)
    assert [len(tok.encode(" " + d, add_special_tokens=False)) for _, d in pairs] == p_len.tolist()
    assert [len(tok.encode(" " + q, add_special_tokens=False)) for q, _ in pairs] == q_len.tolist()


def test_qwen_baseline_pairs_give_the_official_recipe_scores(tmp_path):
    """(a) for Qwen3 feeds CrossEncoder the template split in two halves; that must be the official recipe:
    prefix + <Instruct>/<Query>/<Document> + suffix, last-token logit(yes) - logit(no)."""
    import torch
    from sentence_transformers import CrossEncoder
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from models.families.qwen3 import DEFAULT_INSTRUCTION, PREFIX, SUFFIX
    from tests.tiny_models import DOCS, QUERIES, build_qwen3_reranker

    path = build_qwen3_reranker(tmp_path / "qwen3")
    pairs = [(q, d) for q in QUERIES[:2] for d in DOCS[:3]]
    ce = CrossEncoder(str(path), device="cpu", model_kwargs={"dtype": torch.float32})
    baseline = ce.predict(run.qwen_st_pairs(pairs), activation_fn=torch.nn.Identity(), show_progress_bar=False)

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    yes, no = tok.convert_tokens_to_ids(["yes", "no"])
    official = []
    for q, d in pairs:
        text = f"{PREFIX}<Instruct>: {DEFAULT_INSTRUCTION}\n<Query>: {q}\n<Document>: {d}{SUFFIX}"
        with torch.no_grad():
            logits = model(**tok(text, return_tensors="pt")).logits[0, -1]
        official.append((logits[yes] - logits[no]).item())
    assert np.abs(np.asarray(baseline) - np.asarray(official)).max() <= 1e-5


def test_long_documents_have_their_planned_token_counts():
    from benchmarks import long_docs

    tok = build.modernbert_tokenizer()
    pairs = long_docs.make_long_pairs(6, 2000, seed=0)
    counts = [len(tok.encode(d, add_special_tokens=False)) for _, d in pairs]
    assert all(1800 <= n <= 2200 for n in counts), counts
    assert all(8 <= len(tok.encode(q, add_special_tokens=False)) <= 16 for q, _ in pairs)
