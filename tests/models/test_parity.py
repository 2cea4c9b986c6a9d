"""Raw scores equal the reference implementations run here, in fp32 on CPU, to 1e-5 (docs/API.md, Scores).

References: sentence-transformers CrossEncoder.predict(pairs, activation_fn=Identity()) for the modular and
sequence-classification variants; the official Qwen3-Reranker recipe with transformers' full causal LM for
Qwen3. The pairs include documents long enough to be truncated, an empty document and non-ASCII text.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from sentence_transformers import CrossEncoder
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.tiny_models import DOCS, QUERIES

# The recipe passes max_length to tokenizer.pad, which transformers warns is unused there.
pytestmark = pytest.mark.filterwarnings("ignore:`max_length` is ignored when `padding`")

TOL = 1e-5
PAIRS = [(q, d) for q in QUERIES for d in DOCS]
ENCODER_VARIANTS = ["modular", "modular_legacy", "modular_mean_tanh", "bert", "xlmr", "modernbert_cls",
                    "modernbert_cls_pooling"]


def cross_encoder_reference(path, pairs, side: str = "right") -> np.ndarray:
    ce = CrossEncoder(str(path), device="cpu")
    ce.tokenizer.truncation_side = side
    return ce.predict(pairs, activation_fn=torch.nn.Identity(), batch_size=7, convert_to_numpy=True)


@pytest.mark.parametrize("variant", ENCODER_VARIANTS)
@pytest.mark.parametrize("side", ["right", "left"])
def test_encoder_families_match_cross_encoder(tiny, scorers, variant, side):
    scorer = scorers(variant)
    batch = scorer.encoder.encode(PAIRS, direction=side.upper() if side == "left" else "Right")
    assert batch.lengths.max() == scorer.max_length  # some pairs really were truncated
    raw = scorer.score(batch)
    ref = cross_encoder_reference(tiny[variant], PAIRS, side)
    assert raw.dtype == np.float32 and raw.shape == (len(PAIRS),)
    assert np.abs(raw - ref).max() <= TOL, np.abs(raw - ref).max()
    assert np.std(ref) > 1e-3  # the random model does tell pairs apart


@pytest.mark.parametrize("variant", ENCODER_VARIANTS)
def test_tokens_match_the_tokenizer_call(tiny, scorers, variant):
    """The batch is exactly what tokenizer(queries, docs, truncation='longest_first') returns."""
    enc = scorers(variant).encoder
    tok = AutoTokenizer.from_pretrained(str(tiny[variant]))
    ref = tok([q for q, _ in PAIRS], [d for _, d in PAIRS], truncation="longest_first", max_length=enc.max_length)
    batch = enc.encode(PAIRS)
    assert [batch.sequence(i).tolist() for i in range(len(PAIRS))] == ref["input_ids"]
    if "token_type_ids" in ref and variant == "bert":
        assert [batch.token_types(i).tolist() for i in range(len(PAIRS))] == ref["token_type_ids"]


def test_bert_really_uses_token_types(scorers):
    batch = scorers("bert").encoder.encode(PAIRS[:3])
    assert batch.token_type_ids is not None and batch.token_type_ids.max() == 1
    with_types = scorers("bert").score(batch)
    batch.token_type_ids[:] = 0
    assert np.abs(scorers("bert").score(batch) - with_types).max() > 1e-4


@pytest.mark.parametrize("variant", ["modular", "modular_mean_tanh", "bert", "xlmr"])
def test_single_texts_match_cross_encoder(tiny, scorers, variant):
    texts = ["what is the capital of france", "Москва столица России", "berlin " * 80]
    scorer = scorers(variant)
    raw = scorer.score(scorer.encoder.encode([(t, None) for t in texts]))
    ce = CrossEncoder(str(tiny[variant]), device="cpu")
    with torch.inference_mode():
        out = ce(ce.preprocess(texts))
        ref = (out["scores"][:, 0] if "scores" in out else out["logits"][:, 0]).numpy()
    assert np.abs(raw - ref).max() <= TOL


# --- Qwen3-Reranker: the official recipe, written out with transformers -------------------------------------

RECIPE_PREFIX = ("<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and "
                 "the Instruct provided. Note that the answer can only be \"yes\" or \"no\".<|im_end|>\n"
                 "<|im_start|>user\n")
RECIPE_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
RECIPE_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"


def qwen3_recipe(path, pairs, *, instruction=None, max_length=8192, side="right"):
    """(raw logit(yes) - logit(no), official softmax score) from the full AutoModelForCausalLM."""
    tok = AutoTokenizer.from_pretrained(str(path), padding_side="left")
    tok.truncation_side = side
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    yes, no = tok.convert_tokens_to_ids("yes"), tok.convert_tokens_to_ids("no")
    prefix = tok.encode(RECIPE_PREFIX, add_special_tokens=False)
    suffix = tok.encode(RECIPE_SUFFIX, add_special_tokens=False)
    texts = [f"<Instruct>: {instruction or RECIPE_INSTRUCTION}\n<Query>: {q}\n<Document>: {d}" for q, d in pairs]
    inputs = tok(texts, padding=False, truncation="longest_first", return_attention_mask=False,
                 max_length=max_length - len(prefix) - len(suffix))
    inputs["input_ids"] = [prefix + ids + suffix for ids in inputs["input_ids"]]
    inputs = tok.pad(inputs, padding=True, return_tensors="pt", max_length=max_length)
    with torch.inference_mode():
        logits = model(**inputs).logits[:, -1, :]
    pair = torch.stack([logits[:, no], logits[:, yes]], dim=1)
    official = torch.nn.functional.log_softmax(pair, dim=1)[:, 1].exp()
    return (logits[:, yes] - logits[:, no]).numpy(), official.numpy(), inputs["input_ids"], inputs["attention_mask"]


@pytest.mark.parametrize("variant", ["qwen3_tied", "qwen3_untied"])
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("max_length", [None, 140])
def test_qwen3_matches_official_recipe(tiny, scorers, variant, side, max_length):
    scorer = scorers(variant, max_length=max_length) if max_length else scorers(variant)
    batch = scorer.encoder.encode(PAIRS, direction=side)
    raw = scorer.score(batch)
    ref_raw, official, ref_ids, ref_mask = qwen3_recipe(tiny[variant], PAIRS, max_length=scorer.max_length,
                                                        side=side)
    # Same tokens as the recipe (its batch is left-padded).
    assert [batch.sequence(i).tolist() for i in range(len(PAIRS))] == \
        [ids[m.bool()].tolist() for ids, m in zip(ref_ids, ref_mask)]
    if max_length:
        assert batch.lengths.max() == max_length  # truncated, prefix and suffix kept
    assert np.abs(raw - ref_raw).max() <= TOL, np.abs(raw - ref_raw).max()
    # sigmoid(raw) is the recipe's own normalised score.
    assert np.abs(1 / (1 + np.exp(-raw.astype(np.float64))) - official).max() <= TOL


def test_qwen3_custom_instruction_matches_recipe(tiny, scorers):
    scorer = scorers("qwen3_tied")
    instruction = "Judge whether the document answers the query about a capital city"
    raw = scorer.score(scorer.encoder.encode(PAIRS, instruction=instruction))
    ref_raw, *_ = qwen3_recipe(tiny["qwen3_tied"], PAIRS, instruction=instruction, max_length=scorer.max_length)
    assert np.abs(raw - ref_raw).max() <= TOL
    default_raw = scorer.score(scorer.encoder.encode(PAIRS))
    assert np.abs(default_raw - raw).max() > 1e-3  # the instruction does reach the model


def test_untied_qwen3_uses_lm_head_not_embeddings(tiny, scorers):
    """Scoring the untied model with the embedding rows would give different numbers (the 8B bug)."""
    scorer = scorers("qwen3_untied")
    assert not scorer.logits.tied
    assert not any(p.shape[0] == scorer.model.config.vocab_size and p is not
                   scorer.model.get_input_embeddings().weight for p in scorer.model.parameters())  # no lm_head kept
    batch = scorer.encoder.encode(PAIRS)
    raw = scorer.score(batch)
    model = AutoModelForCausalLM.from_pretrained(str(tiny["qwen3_untied"]), dtype=torch.float32)
    yes, no = scorer.encoder.tokenizer.convert_tokens_to_ids(["yes", "no"])
    emb = model.get_input_embeddings().weight.detach()
    head = model.lm_head.weight.detach()
    assert not torch.equal(emb, head)
    with torch.inference_mode():
        h = torch.stack([model.model(torch.tensor([batch.sequence(i).tolist()])).last_hidden_state[0, -1]
                         for i in range(len(batch))])
    with_embeddings = (h @ (emb[yes] - emb[no])).numpy()
    with_head = (h @ (head[yes] - head[no])).numpy()
    assert np.abs(raw - with_head).max() <= TOL
    assert np.abs(raw - with_embeddings).max() > 0.1
