"""Detection, load errors, Hub resolution without network, the max input length rule, ModernBERT rope thetas."""
from __future__ import annotations

import json
import shutil
import sys
import time

import numpy as np
import pytest
import torch
from sentence_transformers import CrossEncoder

from models import FAMILIES, ModelLoadError, detect_family, load_encoder, load_scorer, resolve_model_dir
from models.hub import needed_files
from tests.tiny_models import DOCS, QUERIES

PAIRS = [(q, d) for q in QUERIES for d in DOCS]
EXPECTED = {"modular": "modular", "modular_legacy": "modular", "modular_mean_tanh": "modular", "bert": "seq_cls",
            "xlmr": "seq_cls", "modernbert_cls": "seq_cls", "modernbert_cls_pooling": "seq_cls", "qwen3_tied": "qwen3",
            "qwen3_untied": "qwen3"}


@pytest.fixture
def copy_of(tiny, tmp_path):
    """A private, editable copy of a tiny model (with the backbone folder modular builds keep next to it)."""
    def make(name: str):
        dst = tmp_path / name
        shutil.copytree(tiny[name], dst)
        return dst
    return make


def edit_json(path, **changes):
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_detects_every_family(tiny, name):
    assert detect_family(tiny[name]) == EXPECTED[name]
    assert EXPECTED[name] in FAMILIES


def test_unknown_module_after_pooling_is_named(copy_of):
    path = copy_of("modular")
    modules = json.loads((path / "modules.json").read_text())
    modules.insert(2, {"idx": 2, "name": "norm", "path": "2_Normalize",
                       "type": "sentence_transformers.models.Normalize"})
    for i, m in enumerate(modules):
        m["idx"] = i
    (path / "modules.json").write_text(json.dumps(modules))
    for load in (load_encoder, load_scorer):
        with pytest.raises(ModelLoadError, match="Normalize"):
            load(str(path))


def test_last_module_must_be_the_scores_dense(copy_of):
    path = copy_of("modular")
    edit_json(path / "4_Dense" / "config.json", module_output_name="sentence_embedding")
    with pytest.raises(ModelLoadError, match="scores"):
        load_encoder(str(path))


def test_activation_outside_torch_nn_is_never_imported(copy_of, tmp_path, monkeypatch):
    evil = tmp_path / "evil_activation_pkg.py"
    evil.write_text("import os\nos.environ['EVIL_IMPORTED'] = '1'\nclass Act:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    path = copy_of("modular")
    edit_json(path / "2_Dense" / "config.json", activation_function="evil_activation_pkg.Act")
    with pytest.raises(ModelLoadError, match="evil_activation_pkg.Act"):
        load_scorer(str(path))
    assert "evil_activation_pkg" not in sys.modules


@pytest.mark.parametrize("activation", ["torch.nn.functional.gelu", "torch.nn.modules.activation.NoSuchThing"])
def test_activation_must_be_a_torch_nn_module_class(copy_of, activation):
    path = copy_of("modular")
    edit_json(path / "2_Dense" / "config.json", activation_function=activation)
    with pytest.raises(ModelLoadError, match="activation"):
        load_scorer(str(path))


def test_missing_module_weights_name_the_folder(copy_of):
    path = copy_of("modular")
    (path / "2_Dense" / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="2_Dense"):
        load_scorer(str(path))


def test_module_weights_from_pytorch_bin(copy_of, tiny, scorers):
    from safetensors.torch import load_file

    path = copy_of("modular")
    for folder in ("2_Dense", "3_LayerNorm", "4_Dense"):
        state = load_file(str(path / folder / "model.safetensors"))
        torch.save(state, path / folder / "pytorch_model.bin")
        (path / folder / "model.safetensors").unlink()
    scorer = load_scorer(str(path), dtype="float32", device="cpu")
    batch = scorer.encoder.encode(PAIRS)
    assert np.array_equal(scorer.score(batch), scorers("modular").score(batch))


def test_checkpoint_without_the_classifier_is_an_error(copy_of):
    """transformers would initialise the missing head at random; the scores would be noise."""
    from safetensors.torch import load_file, save_file

    path = copy_of("bert")
    state = load_file(str(path / "model.safetensors"))
    save_file({k: v for k, v in state.items() if not k.startswith("classifier.")}, str(path / "model.safetensors"),
              metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match="classifier"):
        load_scorer(str(path))


def test_missing_config_is_named(copy_of):
    path = copy_of("bert")
    (path / "config.json").unlink()
    with pytest.raises(ModelLoadError, match="config.json"):
        load_encoder(str(path))


def test_missing_tokenizer_is_an_error(copy_of):
    path = copy_of("bert")
    (path / "tokenizer.json").unlink()
    with pytest.raises(ModelLoadError):
        load_encoder(str(path))


def test_unsupported_architecture(copy_of):
    path = copy_of("bert")
    edit_json(path / "config.json", architectures=["BertForMaskedLM"])
    with pytest.raises(ModelLoadError, match="unsupported architecture.*BertForMaskedLM"):
        detect_family(path)


def test_family_override(tiny):
    with pytest.raises(ModelLoadError, match="family"):
        load_encoder(str(tiny["bert"]), family="bogus")
    with pytest.raises(ModelLoadError, match="modules.json"):
        load_encoder(str(tiny["bert"]), family="modular")
    assert load_encoder(str(tiny["bert"]), family="seq_cls").family == "seq_cls"


@pytest.mark.parametrize("bad", ["/no/such/model/dir", "./relative/missing", "~/missing-model", "a/b/c"])
def test_bad_local_path_fails_at_once(bad):
    start = time.monotonic()
    with pytest.raises(ModelLoadError, match="no such local directory"):
        resolve_model_dir(bad)
    assert time.monotonic() - start < 1


def test_no_network_fails_fast(monkeypatch, tmp_path):
    """An unreachable Hub (a closed local port here) is a ModelLoadError in seconds, not a retry loop."""
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    start = time.monotonic()
    with pytest.raises(ModelLoadError, match="cannot reach the Hugging Face Hub") as err:
        load_scorer("cross-encoder/ettin-reranker-17m-v1")
    assert time.monotonic() - start < 5
    assert "cross-encoder/ettin-reranker-17m-v1" in str(err.value)


def test_offline_mode_without_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE"):
        resolve_model_dir("org/model")


def _fake_cache(tmp_path, tiny, repo="org/tiny-bert"):
    """A Hub cache entry laid out as huggingface_hub writes it: refs/main -> snapshots/<commit>/files."""
    commit = "0" * 40
    root = tmp_path / "cache" / ("models--" + repo.replace("/", "--"))
    shutil.copytree(tiny["bert"], root / "snapshots" / commit)
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    return root / "snapshots" / commit


@pytest.mark.parametrize("offline", [True, False])
def test_cached_model_is_used_offline_or_without_network(monkeypatch, tmp_path, tiny, offline):
    snapshot = _fake_cache(tmp_path, tiny)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    assert resolve_model_dir("org/tiny-bert") == snapshot
    assert load_encoder("org/tiny-bert").model_id == "org/tiny-bert"


def test_download_list_takes_only_what_the_model_needs():
    listing = ["config.json", "model.safetensors", "pytorch_model.bin", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "sentencepiece.bpe.model", "README.md", ".gitattributes", "modules.json",
               "1_Pooling/config.json", "2_Dense/config.json", "2_Dense/pytorch_model.bin",
               "3_Dense/config.json", "3_Dense/model.safetensors", "onnx/model.onnx", "onnx/config.json",
               "openvino/openvino_model.bin", "training_args.bin", "tf_model.h5", "flax_model.msgpack",
               "model.safetensors.index.json"]
    assert sorted(needed_files(listing)) == sorted([
        "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
        "sentencepiece.bpe.model", "modules.json", "1_Pooling/config.json", "2_Dense/config.json",
        "2_Dense/pytorch_model.bin", "3_Dense/config.json", "3_Dense/model.safetensors",
        "model.safetensors.index.json"])
    assert sorted(needed_files(["config.json", "pytorch_model.bin", "vocab.txt"])) == \
        ["config.json", "pytorch_model.bin", "vocab.txt"]


# --- max input length (docs/API.md) -----------------------------------------------------------------------------

def test_xlmr_position_limit_is_max_positions_minus_pad_minus_one(copy_of):
    path = copy_of("xlmr")
    edit_json(path / "tokenizer_config.json", model_max_length=int(1e30))  # no tokenizer limit
    cfg = json.loads((path / "config.json").read_text())
    assert load_encoder(str(path)).max_length == cfg["max_position_embeddings"] - cfg["pad_token_id"] - 1 == 64
    edit_json(path / "tokenizer_config.json", model_max_length=512)  # a tokenizer claiming more than positions
    assert load_encoder(str(path)).max_length == 64


def test_tokenizer_limit_below_positions_wins(tiny):
    assert load_encoder(str(tiny["bert"])).max_length == 64  # tokenizer 64, positions 128


def test_configured_max_length(tiny):
    assert load_encoder(str(tiny["bert"]), max_length=20).max_length == 20
    assert load_scorer(str(tiny["bert"]), max_length=20).max_length == 20
    with pytest.raises(ModelLoadError, match="position limit"):
        load_encoder(str(tiny["xlmr"]), max_length=65)


def test_qwen3_max_length_is_8192_capped_by_positions(copy_of, tiny):
    assert load_encoder(str(tiny["qwen3_tied"])).max_length == 512  # positions 512 < 8192
    path = copy_of("qwen3_tied")
    edit_json(path / "config.json", max_position_embeddings=40960)
    assert load_encoder(str(path)).max_length == 8192
    assert load_encoder(str(path), max_length=16384).max_length == 16384


def test_sentence_bert_config_max_seq_length_and_lower_case(copy_of):
    """sentence_bert_config.json's max_seq_length and do_lower_case are honoured as CrossEncoder does."""
    path = copy_of("modular")
    edit_json(path / "sentence_bert_config.json", max_seq_length=20, do_lower_case=True)
    pairs = [("What Is The CAPITAL of France", "PARIS is the capital " * 5), ("Café", "RÉSUMÉ")] + PAIRS
    scorer = load_scorer(str(path), dtype="float32", device="cpu")
    assert scorer.max_length == 20
    raw = scorer.score(scorer.encoder.encode(pairs))
    ref = CrossEncoder(str(path), device="cpu").predict(pairs, activation_fn=torch.nn.Identity())
    assert np.abs(raw - ref).max() <= 1e-5
    lower = scorer.score(scorer.encoder.encode([(q.lower(), d.lower()) for q, d in pairs]))
    assert np.array_equal(raw, lower)


# --- ModernBERT rope thetas --------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["single_rope_theta", "flat_rope_parameters", "global_and_local"])
def test_saved_rope_thetas_are_honoured(copy_of, scorers, tiny, layout):
    """The same weights with the 160000 thetas saved in layouts transformers 5 misreads (a single rope_theta is
    ignored and the local theta becomes 10000; a flat rope_parameters is rejected) score like the original."""
    path = copy_of("modular")
    cfg = json.loads((path / "config.json").read_text())
    cfg.pop("rope_parameters")
    if layout == "single_rope_theta":
        cfg.pop("layer_types")
        cfg["rope_theta"] = 160000.0
    elif layout == "flat_rope_parameters":
        cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": 160000.0}
    else:
        cfg.pop("layer_types")
        cfg.update(global_rope_theta=160000.0, local_rope_theta=160000.0)
    (path / "config.json").write_text(json.dumps(cfg))
    scorer = load_scorer(str(path), dtype="float32", device="cpu")
    layers = scorer.backbone.config.rope_parameters
    assert layers["full_attention"]["rope_theta"] == layers["sliding_attention"]["rope_theta"] == 160000.0
    batch = scorer.encoder.encode(PAIRS)
    ref = CrossEncoder(str(tiny["modular"]), device="cpu").predict(PAIRS, activation_fn=torch.nn.Identity())
    assert np.abs(scorer.score(batch) - ref).max() <= 1e-5


def test_wrong_local_theta_would_change_scores(copy_of, tiny, scorers):
    """Guards the test above: 10000 on the local layers (transformers 5's default) moves the scores."""
    path = copy_of("modular")
    cfg = json.loads((path / "config.json").read_text())
    cfg["rope_parameters"]["sliding_attention"]["rope_theta"] = 10000.0
    (path / "config.json").write_text(json.dumps(cfg))
    batch = scorers("modular").encoder.encode(PAIRS)
    wrong = load_scorer(str(path), dtype="float32", device="cpu").score(batch)
    assert np.abs(wrong - scorers("modular").score(batch)).max() > 1e-3


def test_missing_saved_theta_keeps_the_model_defaults(copy_of):
    from models.config import load_config

    path = copy_of("modular_legacy")
    edit_json(path / "config.json", local_rope_theta=None, global_rope_theta=None)
    rope = load_config("m", path).rope_parameters
    assert rope["full_attention"]["rope_theta"] == 160000.0 and rope["sliding_attention"]["rope_theta"] == 10000.0
