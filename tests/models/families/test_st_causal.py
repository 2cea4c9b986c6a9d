"""Sentence Transformers causal CrossEncoders (Transformer text-generation + LogitScore) against
`CrossEncoder(dir).predict(pairs, activation_fn=Identity())` of sentence-transformers, fp32 CPU, 1e-5: the same
token ids (chat template, prompt as system message, truncation at the max length, restored suffix) and the same
raw scores, in both truncation directions, padded and packed."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from sentence_transformers import CrossEncoder

from models import (InputTooLongError, InstructionNotSupportedError, ModelLoadError, PairRequiredError, attention,
                    detect_family, load_encoder)
from tests.llm_rerankers import build_st_causal
from tests.tiny_models import DOCS, QUERIES, cached_scorers

pytestmark = pytest.mark.filterwarnings("ignore:`max_length` is ignored when `padding`")

TOL = 1e-5
PAIRS = [(q, d) for q in QUERIES for d in DOCS] + [("berlin population " * 30, "berlin")]  # a query-heavy cut too
VARIANTS = ("flat", "structured", "gemma2")


@pytest.fixture(scope="module")
def st_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("st-causal")
    dirs = {v: build_st_causal(root / v, variant=v, seed=11 + i) for i, v in enumerate(VARIANTS)}
    # restore_suffix off: a cut row keeps whatever tokens the cut left at its end
    dirs["no_restore"] = root / "no_restore"
    shutil.copytree(dirs["flat"], dirs["no_restore"])
    cfg_file = dirs["no_restore"] / "sentence_bert_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["processing_kwargs"] = {"chat_template": {"restore_suffix": False}}
    cfg_file.write_text(json.dumps(cfg))
    return dirs


_REFS: dict = {}


def reference(path, pairs, *, side="right", prompt=None):
    """(raw scores, token id rows without padding) from sentence-transformers."""
    key = str(path)
    if key not in _REFS:
        _REFS[key] = CrossEncoder(str(path), device="cpu")
    ce = _REFS[key]
    ce.tokenizer.truncation_side = side
    kw = {} if prompt is None else {"prompt": prompt}
    scores = ce.predict(pairs, activation_fn=torch.nn.Identity(), batch_size=8, **kw)
    features = ce.preprocess(pairs, prompt=ce._resolve_prompt(prompt, None))
    rows = [ids[mask.bool()].tolist() for ids, mask in zip(features["input_ids"], features["attention_mask"])]
    assert all(features["attention_mask"][:, -1] == 1)  # left padded
    return np.asarray(scores, dtype=np.float32), rows


@pytest.fixture(scope="module")
def st_scorers(st_dirs):
    return cached_scorers(st_dirs)


def test_detected_from_modules_json(st_dirs):
    for path in st_dirs.values():
        assert detect_family(path) == "st_causal"
    enc = load_encoder(str(st_dirs["structured"]))
    assert enc.family == "st_causal" and enc.accepts_instruction and not enc.accepts_single
    assert enc.default_instruction == "Given a web search query, retrieve relevant passages"
    assert load_encoder(str(st_dirs["flat"])).default_instruction is None
    assert (load_encoder(str(st_dirs["flat"])).max_length, enc.max_length) == (96, 80)


@pytest.mark.parametrize("name", ["flat", "structured", "no_restore", "gemma2"])
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("instruction", [None, "judge", ""])
def test_matches_sentence_transformers(st_dirs, st_scorers, name, side, instruction):
    scorer = st_scorers(name)
    batch = scorer.encoder.encode(PAIRS, direction=side, instruction=instruction)
    ref, ref_rows = reference(st_dirs[name], PAIRS, side=side, prompt=instruction)
    assert [batch.sequence(i).tolist() for i in range(len(PAIRS))] == ref_rows
    assert batch.lengths.max() == scorer.max_length  # inputs long enough to be cut
    raw = scorer.score(batch)
    assert raw.dtype == np.float32 and np.abs(raw - ref).max() <= TOL, np.abs(raw - ref).max()
    assert np.std(ref) > 1e-3


@pytest.mark.parametrize("name", ["flat", "structured"])
def test_cut_rows_end_with_the_template_tail(st_scorers, name):
    enc = st_scorers(name).encoder
    suffix = enc.suffix_ids(enc.default_instruction)
    assert len(suffix) >= 3
    assert "assistant" in enc.tokenizer.decode(suffix)  # the tail after the document, up to the answer
    short = enc.encode([("q", "d")])  # uncut: ends with the template's tail anyway
    assert short.sequence(0)[-len(suffix):].tolist() == suffix
    batch = enc.encode(PAIRS)
    cut = [i for i in range(len(PAIRS)) if batch.lengths[i] == enc.max_length]
    assert cut and all(batch.sequence(i)[-len(suffix):].tolist() == suffix for i in cut)


def test_no_restore_loses_the_tail(st_scorers):
    enc = st_scorers("no_restore").encoder
    suffix = st_scorers("flat").encoder.suffix_ids(None)
    batch = enc.encode(PAIRS)
    cut = [i for i in range(len(PAIRS)) if batch.lengths[i] == enc.max_length]
    assert sum(batch.sequence(i)[-len(suffix):].tolist() != suffix for i in cut) >= len(cut) // 2


@pytest.mark.parametrize("name", ["flat", "structured"])
def test_packed_equals_padded(st_dirs, st_scorers, name):
    padded = st_scorers(name)
    packed = st_scorers(name, execution="packed", token_budget=200)
    assert padded.execution == "padded" and packed.execution == "packed" and packed.supports_packed
    batch = padded.encoder.encode(PAIRS, direction="left", instruction="judge")
    with attention.force_backend("segments"):
        raw = packed.score(batch)
    assert np.abs(raw - padded.score(batch)).max() <= TOL
    ref, _ = reference(st_dirs[name], PAIRS, side="left", prompt="judge")
    assert np.abs(raw - ref).max() <= TOL


def test_bad_input(st_scorers):
    enc = st_scorers("flat").encoder
    with pytest.raises(PairRequiredError):
        enc.encode([("only a query", None)])
    with pytest.raises(InputTooLongError):
        enc.encode(PAIRS, truncate=False)
    short = enc.encode([("q", "d")], truncate=False)
    assert len(short) == 1
    cut = enc.encode([(QUERIES[0], DOCS[5])], max_tokens_per_doc=3)
    whole = enc.encode([(QUERIES[0], DOCS[5])])
    assert cut.lengths[0] < whole.lengths[0]


def test_instruction_for_a_model_without_one_is_rejected(tiny):
    """The other side of `instruction`: encoder-only cross-encoders take none (a 422 at the HTTP layer)."""
    with pytest.raises(InstructionNotSupportedError):
        load_encoder(str(tiny["modular"])).encode([("q", "d")], instruction="judge")


def test_wrong_module_chain_is_named(st_dirs, tmp_path):
    path = tmp_path / "m"
    shutil.copytree(st_dirs["flat"], path)
    modules = json.loads((path / "modules.json").read_text())
    modules.append({"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.base.modules.Dense"})
    (path / "modules.json").write_text(json.dumps(modules))
    assert detect_family(path) == "st_causal"
    with pytest.raises(ModelLoadError, match="Transformer -> LogitScore"):
        load_encoder(str(path))


def test_template_without_pair_roles_is_refused(st_dirs, tmp_path):
    path = tmp_path / "m"
    shutil.copytree(st_dirs["flat"], path)
    (path / "chat_template.jinja").write_text("{% for m in messages %}{% if m.role == 'user' %}{{ m.content }}"
                                              "{% endif %}{% endfor %}")
    with pytest.raises(ModelLoadError, match="roles"):
        load_encoder(str(path))
