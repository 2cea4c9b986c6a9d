"""bge-reranker-v2-gemma against FlagEmbedding 1.4.2's `FlagLLMReranker.compute_score(..., normalize=False)`,
fp32 CPU, 1e-5: same token ids, same raw scores (the logit of "Yes"), both truncation directions, the default and
custom prompts (our `instruction`), the default and a configured max length.

FlagEmbedding 1.4.2's package root imports every model it ships, one of which (MiniCPM) needs a transformers 4
module, so `import FlagEmbedding` fails under transformers 5. The LLM reranker itself works with transformers 5
(its own compat helpers); the tests import that one module without running the package root.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from models import InputTooLongError, ModelLoadError, PairRequiredError, attention, detect_family, load_encoder, \
    load_scorer
from models.families.bge_gemma import DEFAULT_PROMPT
from tests.llm_rerankers import build_bge_gemma
from tests.tiny_models import DOCS, QUERIES, cached_scorers

TOL = 1e-5
PAIRS = [(q, d) for q in QUERIES for d in DOCS] + [("berlin population " * 40, "berlin")]
CUSTOM = "Does passage B answer query A? Say 'Yes' or 'No'."


@functools.lru_cache(maxsize=1)
def flag_llm_reranker_class():
    """FlagEmbedding's BaseLLMReranker (exported as FlagLLMReranker), imported without the package root."""
    spec = importlib.util.find_spec("FlagEmbedding")
    assert spec is not None, "FlagEmbedding==1.4.2 (the test extra) is not installed"
    root = Path(spec.submodule_search_locations[0])
    for name in ("FlagEmbedding", "FlagEmbedding.inference", "FlagEmbedding.inference.reranker",
                 "FlagEmbedding.inference.reranker.decoder_only", "FlagEmbedding.inference.reranker.encoder_only"):
        if name not in sys.modules:
            package = types.ModuleType(name)
            package.__path__ = [str(root.joinpath(*name.split(".")[1:]))]
            sys.modules[name] = package
    return importlib.import_module("FlagEmbedding.inference.reranker.decoder_only.base").BaseLLMReranker


@pytest.fixture(scope="module")
def bge_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("bge")
    return {"tied": build_bge_gemma(root / "bge-reranker-v2-gemma", seed=31),
            "untied": build_bge_gemma(root / "models--BAAI--bge-reranker-v2-gemma" / "snapshots" / "abc", seed=32,
                                      tied=False, positions=256)}


_REFS: dict = {}


def reference(path, pairs, *, side="right", prompt=None, max_length=512):
    """(raw scores, token rows) of FlagLLMReranker (normalize=False)."""
    if str(path) not in _REFS:
        _REFS[str(path)] = flag_llm_reranker_class()(str(path), devices="cpu", normalize=False)
    model = _REFS[str(path)]
    model.tokenizer.truncation_side = side
    scores = model.compute_score(pairs, prompt=prompt, max_length=max_length, normalize=False)
    # Its input rows, rebuilt from the same pieces through its own dataset class.
    tok = model.tokenizer
    detailed = model.get_detailed_inputs(pairs)
    q = tok([p[0] for p in detailed], add_special_tokens=False, max_length=max_length * 3 // 4, truncation=True)
    d = tok([p[1] for p in detailed], add_special_tokens=False, max_length=max_length, truncation=True)
    base = importlib.import_module("FlagEmbedding.inference.reranker.decoder_only.base")
    dataset = base.DatasetForReranker(
        [{"input_ids": x} for x in q["input_ids"]], [{"input_ids": x} for x in d["input_ids"]], str(path),
        max_length, prompt=prompt)
    dataset.tokenizer.truncation_side = side
    rows = [dataset[i]["input_ids"] for i in range(len(pairs))]
    return np.asarray(scores, dtype=np.float32), rows


@pytest.fixture(scope="module")
def bge_scorers(bge_dirs):
    return cached_scorers(bge_dirs)


def test_detected_by_name_only(bge_dirs, tmp_path):
    assert detect_family(bge_dirs["tied"]) == detect_family(bge_dirs["untied"]) == "bge_gemma"
    other = tmp_path / "gemma-2b"
    shutil.copytree(bge_dirs["tied"], other)
    with pytest.raises(ModelLoadError, match="GemmaForCausalLM"):
        detect_family(other)
    enc = load_encoder(str(other), family="bge_gemma")
    assert enc.family == "bge_gemma" and enc.default_instruction == DEFAULT_PROMPT


@pytest.mark.parametrize("name", ["tied", "untied"])
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("instruction", [None, CUSTOM])
def test_matches_flag_llm_reranker(bge_dirs, bge_scorers, name, side, instruction):
    # passage length 48: every long input is cut (the untied model's 256 positions cap the default)
    scorer = bge_scorers(name, max_length=48 + bge_scorers(name).max_length - bge_scorers(name).encoder.passage_length)
    assert scorer.encoder.passage_length == 48
    ref, rows = reference(bge_dirs[name], PAIRS, side=side, prompt=instruction, max_length=48)
    batch = scorer.encoder.encode(PAIRS, direction=side, instruction=instruction)
    assert [batch.sequence(i).tolist() for i in range(len(PAIRS))] == rows
    raw = scorer.score(batch)
    assert np.abs(raw - ref).max() <= TOL, np.abs(raw - ref).max()
    assert np.std(ref) > 1e-3


def test_default_length_matches(bge_dirs, bge_scorers):
    scorer = bge_scorers("tied")
    assert scorer.encoder.passage_length == 512
    ref, rows = reference(bge_dirs["tied"], PAIRS, side="right")
    batch = scorer.encoder.encode(PAIRS)
    assert [batch.sequence(i).tolist() for i in range(len(PAIRS))] == rows
    assert np.abs(scorer.score(batch) - ref).max() <= TOL


def test_a_real_tokenizer_limit_bounds_the_input_and_sets_flag_embeddings_length(tmp_path):
    """docs/API.md, Max input length as for every family: a tokenizer model_max_length that is a real limit (128 here) is the max input
    length, capped by the positions; FlagEmbedding's max_length L is that minus the prompt overhead, and long pairs
    score as FlagLLMReranker does at L."""
    path = build_bge_gemma(tmp_path / "limited" / "bge-reranker-v2-gemma", seed=33, model_max_length=128)
    scorer = load_scorer(str(path), dtype="float32", device="cpu")
    assert scorer.max_length == scorer.encoder.max_length == 128
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    overhead = 2 * (len(tok.encode("\n", add_special_tokens=False)) + len(tok.encode(DEFAULT_PROMPT,
                                                                                    add_special_tokens=False)))
    length = 128 - overhead
    assert scorer.encoder.passage_length == length and length > 32
    ref, rows = reference(path, PAIRS, max_length=length)
    batch = scorer.encoder.encode(PAIRS)
    assert [batch.sequence(i).tolist() for i in range(len(PAIRS))] == rows
    assert max(len(r) for r in rows) <= 128
    with pytest.raises(InputTooLongError):  # the limit cut some pairs: the comparison covers truncation
        scorer.encoder.encode(PAIRS, truncate=False)
    assert np.abs(scorer.score(batch) - ref).max() <= TOL
    # The positions still bound it: a tokenizer limit above them gives way.
    capped = build_bge_gemma(tmp_path / "capped" / "bge-reranker-v2-gemma", seed=34, positions=200,
                             model_max_length=4096)
    assert load_encoder(str(capped)).max_length == 200


def test_packed_equals_padded(bge_dirs, bge_scorers):
    padded = bge_scorers("tied")
    packed = bge_scorers("tied", execution="packed", token_budget=300)
    assert packed.execution == "packed"
    batch = padded.encoder.encode(PAIRS, direction="left", instruction=CUSTOM)
    with attention.force_backend("segments"):
        raw = packed.score(batch)
    assert np.abs(raw - padded.score(batch)).max() <= TOL


def test_bad_input(bge_scorers):
    enc = bge_scorers("untied").encoder
    with pytest.raises(PairRequiredError):
        enc.encode([("q", None)])
    with pytest.raises(InputTooLongError):
        enc.encode(PAIRS, truncate=False)
    assert len(enc.encode([("q", "d")], truncate=False)) == 1
    with pytest.raises(InputTooLongError, match="instruction"):  # a prompt longer than the positions left
        enc.encode([("q", "d")], instruction="".join(chr(0x4E00 + i) for i in range(300)))
