"""mxbai-rerank-v2 against the official `mxbai-rerank` package (0.1.6, `MxbaiRerankV2.predict`, raw: no
normalisation), fp32 CPU, 1e-5: same token ids, same raw scores, both truncation directions, with and without an
instruction, at the default max length (where the position limit shapes the document cut) and a configured one.

mxbai-rerank 0.1.6 calls `tokenizer.prepare_for_model`, which transformers 5 removed; the tests give the
package's tokenizer that method back with transformers 4's semantics for the one call it makes (two id lists,
no special tokens, "only_second" truncation on the tokenizer's truncation side). Everything else is the package.
"""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from models import InputTooLongError, ModelLoadError, PairRequiredError, attention, detect_family, load_encoder
from tests.llm_rerankers import _build_mxbai
from tests.tiny_models import DOCS, QUERIES, cached_scorers

TOL = 1e-5
PAIRS = [(q, d) for q in QUERIES for d in DOCS] + [("berlin population " * 30, "berlin")]


@pytest.fixture(scope="module")
def mx_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("mxbai")
    return {"base": _build_mxbai(root / "mxbai-rerank-base-v2", seed=21, extra_positions=80, tied=True),
            "large": _build_mxbai(root / "models--mixedbread-ai--mxbai-rerank-large-v2" / "snapshots" / "0123abc",
                                  seed=22, extra_positions=400, tied=False)}


def _legacy_prepare_for_model(tokenizer):
    """transformers 4's `prepare_for_model(ids, pair_ids, truncation="only_second", max_length=..., add_special_
    tokens=False, ...)`: cut the pair from the tokenizer's truncation side when it is longer than the overflow."""
    def prepare(ids, pair_ids, *, truncation, max_length, add_special_tokens, **_):
        assert truncation == "only_second" and not add_special_tokens
        ids, pair_ids = list(ids), list(pair_ids)
        over = len(ids) + len(pair_ids) - max_length
        if 0 < over < len(pair_ids):
            pair_ids = pair_ids[over:] if tokenizer.truncation_side == "left" else pair_ids[:-over]
        return {"input_ids": ids + pair_ids}
    return prepare


_REFS: dict = {}


def reference(path, pairs, *, side="right", instruction=None, max_length=8192):
    """(raw scores, token rows) from mxbai_rerank.MxbaiRerankV2."""
    key = (str(path), max_length)
    if key not in _REFS:
        import mxbai_rerank  # here, not at module level: the GPU machine's bundle collects this file without it

        model = mxbai_rerank.MxbaiRerankV2(str(path), device="cpu", torch_dtype=torch.float32, max_length=max_length)
        object.__setattr__(model.tokenizer, "prepare_for_model", _legacy_prepare_for_model(model.tokenizer))
        _REFS[key] = model
    model = _REFS[key]
    model.tokenizer.truncation_side = side
    queries, docs = [q for q, _ in pairs], [d for _, d in pairs]
    inputs = model.prepare_inputs(queries, docs, instruction=instruction)
    rows = [ids[mask.bool()].tolist() for ids, mask in zip(inputs["input_ids"], inputs["attention_mask"])]
    scores = model.predict(queries, docs, instruction=instruction, normalize=False)
    return scores.numpy().astype(np.float32), rows, model


@pytest.fixture(scope="module")
def mx_scorers(mx_dirs):
    return cached_scorers(mx_dirs)


def test_detected_by_name_only(mx_dirs, tmp_path):
    assert detect_family(mx_dirs["base"]) == "mxbai"
    assert detect_family(mx_dirs["large"]) == "mxbai"  # the Hub cache's models--org--name folder
    other = tmp_path / "my-qwen2"
    shutil.copytree(mx_dirs["base"], other)
    with pytest.raises(ModelLoadError, match="Qwen2ForCausalLM.*`family`"):
        detect_family(other)
    assert load_encoder(str(other), family="mxbai").family == "mxbai"


@pytest.mark.parametrize("name", ["base", "large"])
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("instruction", [None, "find the city"])
def test_matches_mxbai_rerank(mx_dirs, mx_scorers, name, side, instruction):
    scorer = mx_scorers(name)
    ref, rows, model = reference(mx_dirs[name], PAIRS, side=side, instruction=instruction)
    assert scorer.max_length == model.max_length + model.predefined_length
    batch = scorer.encoder.encode(PAIRS, direction=side, instruction=instruction)
    assert [batch.sequence(i).tolist() for i in range(len(PAIRS))] == rows
    assert batch.lengths.max() == scorer.max_length or name == "large"
    raw = scorer.score(batch)
    assert np.abs(raw - ref).max() <= TOL, np.abs(raw - ref).max()
    assert np.std(ref) > 1e-3


@pytest.mark.parametrize("side", ["right", "left"])
def test_configured_max_length(mx_dirs, mx_scorers, side):
    """A configured max_length counts the whole input: the package's max_length is it minus the fixed pieces."""
    scorer = mx_scorers("large", max_length=120)
    fixed = scorer.encoder.fixed
    ref, rows, _ = reference(mx_dirs["large"], PAIRS, side=side, instruction="find the city", max_length=120 - fixed)
    batch = scorer.encoder.encode(PAIRS, direction=side, instruction="find the city")
    assert [batch.sequence(i).tolist() for i in range(len(PAIRS))] == rows
    assert batch.lengths.max() == 120
    assert np.abs(scorer.score(batch) - ref).max() <= TOL


def test_packed_equals_padded(mx_dirs, mx_scorers):
    padded, packed = mx_scorers("base"), mx_scorers("base", execution="packed", token_budget=300)
    assert packed.execution == "packed"
    batch = padded.encoder.encode(PAIRS, direction="left")
    with attention.force_backend("segments"):
        raw = packed.score(batch)
    assert np.abs(raw - padded.score(batch)).max() <= TOL
    assert np.abs(raw - reference(mx_dirs["base"], PAIRS, side="left")[0]).max() <= TOL


def test_bad_input(mx_scorers):
    enc = mx_scorers("base").encoder
    with pytest.raises(PairRequiredError):
        enc.encode([("q", None)])
    with pytest.raises(InputTooLongError):
        enc.encode(PAIRS, truncate=False)
    assert len(enc.encode([("q", "d")], truncate=False)) == 1
    assert enc.encode([(QUERIES[0], DOCS[5])], max_tokens_per_doc=3).lengths[0] < \
        enc.encode([(QUERIES[0], DOCS[5])]).lengths[0]
