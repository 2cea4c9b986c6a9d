"""Random-weight rerankers with the REAL shapes, saved in the real on-disk layouts, built offline.

- ettin-17m / ettin-150m: modular Sentence-Transformers cross-encoders (ModernBertModel -> Pooling(cls) ->
  Dense(GELU) -> LayerNorm -> Dense(1, 'scores')), as cross-encoder/ettin-reranker-*-v1 ship them.
- qwen3-0.6b: Qwen3ForCausalLM with Qwen3-Reranker-0.6B's shape, tied embeddings, no id2label.
- jina-v3-0.6b (listwise, benchmarks/listwise.py): jina-reranker-v3's layout, a Qwen3 0.6B backbone as `model.*`
  plus `projector.0` / `projector.2` (1024 -> 512 -> 512), architectures ["JinaForRanking"], the two marker tokens.
- qwen3-small: the same layout, small enough for a 2-core CPU (benchmarks/shared_prefix.py; not in MODELS).

Tokenizers are byte-level BPE trained here on a fixed list of made-up words until every word is ONE token, so
a text of n words is n tokens and the workload's token counts (benchmarks/workload.py) are exact.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch

from .workload import QWEN3_06B, QWEN3_SMALL, TINY_MODELS, ettin_config

NUM_WORDS = 4000
MODELS = ("ettin-17m", "ettin-150m", "qwen3-0.6b")  # the pairwise harness (run.py)
JINA = "jina-v3-0.6b"  # listwise: benchmarks/listwise.py only
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
JINA_MARKERS = ["<|embed_token|>", "<|rerank_token|>"]


def words(n: int = NUM_WORDS, seed: int = 0) -> list[str]:
    """n distinct lowercase pseudo-words of 2-4 syllables."""
    rng = np.random.default_rng(seed)
    consonants, vowels = list("bcdfghklmnprstvz"), list("aeiou")
    out, seen = [], set()
    while len(out) < n:
        w = "".join(rng.choice(consonants) + rng.choice(vowels) for _ in range(rng.integers(2, 5)))
        if w not in seen and w not in ("yes", "no"):
            seen.add(w)
            out.append(w)
    return out


def _train_bpe(corpus: list[str], specials: list[str], add_prefix_space: bool):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space)
    tok.decoder = decoders.ByteLevel()
    # A vocabulary large enough that BPE merges every word of the corpus into a single token.
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=48000, min_frequency=1, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


def _check_one_token_per_word(tok, vocab_words: list[str]) -> None:
    text = " " + " ".join(vocab_words)
    n = len(tok.encode(text, add_special_tokens=False).ids)
    if n != len(vocab_words):
        raise RuntimeError(f"benchmark tokenizer maps {len(vocab_words)} words to {n} tokens, not one each")


def modernbert_tokenizer(model_max_length: int = 512):
    """ModernBERT-style: [CLS] A [SEP] B [SEP], no token types; every benchmark word is one token."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    vocab_words = words()
    tok = _train_bpe([" ".join(vocab_words[i:i + 50]) for i in range(0, len(vocab_words), 50)],
                     ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"], add_prefix_space=True)
    _check_one_token_per_word(tok, vocab_words)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", model_max_length=model_max_length)


def qwen_tokenizer(extra_specials: tuple[str, ...] = (), extra_corpus: tuple[str, ...] = ()):
    """Qwen-style: byte-level BPE, no special tokens added, ChatML specials, 'yes'/'no' single tokens, left pad."""
    from transformers import PreTrainedTokenizerFast

    from models.families.qwen3 import DEFAULT_INSTRUCTION, PREFIX, SUFFIX  # the template's words must tokenize sanely

    vocab_words = words()
    corpus = [" " + " ".join(vocab_words[i:i + 50]) for i in range(0, len(vocab_words), 50)]
    corpus += ["yes", "no", PREFIX, SUFFIX, DEFAULT_INSTRUCTION, "<Instruct>: <Query>: <Document>:", *extra_corpus]
    specials = QWEN_SPECIALS + list(extra_specials)
    tok = _train_bpe(corpus, specials, add_prefix_space=False)
    _check_one_token_per_word(tok, vocab_words)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=specials[1:], model_max_length=131072,
                                   padding_side="left")


def jina_tokenizer():
    """The Qwen-style benchmark tokenizer plus jina-reranker-v3's marker tokens and prompt words."""
    from models.families.jina_v3 import block_prompt

    return qwen_tokenizer(tuple(JINA_MARKERS), (block_prompt("query", ["passage"], "instruction"),))


def _modernbert_config(name: str, tok, **shape):
    return ettin_config(name, pad_token_id=tok.pad_token_id, cls_token_id=tok.cls_token_id,
                        sep_token_id=tok.sep_token_id, bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id,
                        **shape)


def build_ettin(path: Path, name: str, seed: int = 0, shape: dict | None = None) -> Path:
    """ettin's modular cross-encoder, with the real shape of `name` (or `shape` over it)."""
    from sentence_transformers import CrossEncoder
    from sentence_transformers.base.modules import Dense, Transformer
    from sentence_transformers.sentence_transformer.modules import LayerNorm, Pooling
    from transformers import ModernBertModel

    torch.manual_seed(seed)
    tok = modernbert_tokenizer()
    cfg = _modernbert_config(name, tok, **(shape or {}))
    backbone = path.parent / (path.name + "_backbone")
    ModernBertModel(cfg).save_pretrained(backbone)
    tok.save_pretrained(backbone)
    h = cfg.hidden_size
    modules = [Transformer(str(backbone)), Pooling(h, "cls"), Dense(h, h, activation_function=torch.nn.GELU()),
               LayerNorm(h), Dense(h, 1, activation_function=torch.nn.Identity(), module_output_name="scores")]
    CrossEncoder(modules=modules, activation_fn=torch.nn.Identity()).save(str(path))
    shutil.rmtree(backbone)  # the cross-encoder directory holds its own copy of the backbone
    return path


def build_qwen3(path: Path, seed: int = 0, shape: dict | None = None, layers: int | None = None) -> Path:
    """Qwen3-Reranker-0.6B's layout and shape (or `shape` over it; `layers`: a shallower model of its widths)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    tok = qwen_tokenizer()
    shape = {**QWEN3_06B, **(shape or {}), **({"num_hidden_layers": layers} if layers else {})}
    cfg = Qwen3Config(**shape, bos_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    # bf16 on disk as the real checkpoint; loaders up-cast where they run fp32.
    return save_qwen3_reranker(Qwen3ForCausalLM(cfg).to(torch.bfloat16), tok, path)


def save_qwen3_reranker(model, tokenizer, path: Path) -> Path:
    """Save a Qwen3ForCausalLM and its tokenizer in the official Qwen3-Reranker layout: a config without the
    id2label/label2id that save_pretrained writes. tests/tiny_models builds its Qwen3 fixtures with it too."""
    path = Path(path)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    cfg_json = json.loads((path / "config.json").read_text())
    cfg_json.pop("id2label", None)
    cfg_json.pop("label2id", None)
    (path / "config.json").write_text(json.dumps(cfg_json, indent=2))
    return path


def build_jina(path: Path, seed: int = 0, layers: int | None = None) -> Path:
    """jina-reranker-v3's shape (JINA_V3_06B: Qwen3-0.6B, vocab 151936, 131072 positions) and layout."""
    from transformers import Qwen3Config, Qwen3Model

    from .workload import JINA_V3_06B

    torch.manual_seed(seed)
    tok = jina_tokenizer()
    shape = {**JINA_V3_06B, **({"num_hidden_layers": layers} if layers else {})}
    cfg = Qwen3Config(**shape, bos_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    hidden = cfg.hidden_size
    projector = (torch.randn(hidden // 2, hidden) * hidden ** -0.5,
                 torch.randn(512, hidden // 2) * (hidden // 2) ** -0.5)
    return save_jina_reranker(Qwen3Model(cfg).to(torch.bfloat16), projector, tok, path)


def save_jina_reranker(backbone, projector, tokenizer, path: Path) -> Path:
    """Save a Qwen3Model, the projector weights (w1 [H/2, H], w2 [P, H/2]) and the tokenizer in jina-reranker-v3's
    layout: ONE model.safetensors of `model.*` + `projector.0.weight` + `projector.2.weight` (the model's lm_head is
    the identity: no weights), config.json of the backbone with architectures ["JinaForRanking"] and an auto_map to
    the repository's modeling.py. tests/llm_rerankers builds its tiny fixture with it too."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    dtype = next(backbone.parameters()).dtype
    tensors = {f"model.{k}": v.contiguous() for k, v in backbone.state_dict().items()}
    tensors["projector.0.weight"] = projector[0].to(dtype).contiguous()
    tensors["projector.2.weight"] = projector[1].to(dtype).contiguous()
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    config = backbone.config.to_dict()
    config.update(architectures=["JinaForRanking"], auto_map={"AutoModel": "modeling.JinaForRanking"})
    for key in ("id2label", "label2id"):
        config.pop(key, None)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer.save_pretrained(path)
    return path


def build_seq_cls(path: Path, kind: str, shape: dict, seed: int = 0) -> Path:
    """A *ForSequenceClassification reranker (one label) with the benchmark tokenizer: BERT (absolute positions,
    token types) or ModernBERT (gte-reranker-modernbert's mean classifier pooling)."""
    from transformers import BertConfig, BertForSequenceClassification, ModernBertForSequenceClassification

    torch.manual_seed(seed)
    tok = modernbert_tokenizer()
    if kind == "bert":
        cfg = BertConfig(vocab_size=len(tok), max_position_embeddings=512, type_vocab_size=2,
                         pad_token_id=tok.pad_token_id, num_labels=1, **shape)
        model = BertForSequenceClassification(cfg)
    else:
        cfg = _modernbert_config("ettin-17m", tok, classifier_pooling="mean", num_labels=1, **shape)
        model = ModernBertForSequenceClassification(cfg)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def build(name: str, root: Path, layers: int | None = None) -> Path:
    """The model directory of `name` under `root`, built once (reused when already complete). `layers`: a
    shallower model of the same widths (quick runs; its own directory)."""
    path = Path(root) / (f"{name}-L{layers}" if layers else name)
    marker = path / ".complete"
    if marker.exists():
        return path
    if name in ("ettin-17m", "ettin-150m") and not layers:
        build_ettin(path, name)
    elif name == "qwen3-0.6b":
        build_qwen3(path, layers=layers)
    elif name == JINA:
        build_jina(path, layers=layers)
    elif name == "qwen3-small":
        build_qwen3(path, shape=QWEN3_SMALL)
    elif name in TINY_MODELS:
        kind, shape, seed = TINY_MODELS[name]
        if kind == "modular":
            build_ettin(path, "ettin-17m", seed, shape)
        elif kind == "qwen3":
            build_qwen3(path, seed, shape)
        else:
            build_seq_cls(path, kind, shape, seed)
    else:
        known = MODELS + (JINA, "qwen3-small") + tuple(TINY_MODELS)
        raise ValueError(f"unknown benchmark model {name!r}; choose from {known}")
    marker.write_text("ok")
    return path
