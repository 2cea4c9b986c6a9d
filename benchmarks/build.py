"""Random-weight rerankers with the REAL shapes, saved in the real on-disk layouts, built offline.

- ettin-17m / ettin-150m: modular Sentence-Transformers cross-encoders (ModernBertModel -> Pooling(cls) ->
  Dense(GELU) -> LayerNorm -> Dense(1, 'scores')), as cross-encoder/ettin-reranker-*-v1 ship them.
- qwen3-0.6b: Qwen3ForCausalLM with Qwen3-Reranker-0.6B's shape, tied embeddings, no id2label.
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

from .workload import QWEN3_06B, QWEN3_SMALL, ettin_config

NUM_WORDS = 4000
MODELS = ("ettin-17m", "ettin-150m", "qwen3-0.6b")
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]


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


def qwen_tokenizer():
    """Qwen-style: byte-level BPE, no special tokens added, ChatML specials, 'yes'/'no' single tokens, left pad."""
    from transformers import PreTrainedTokenizerFast

    from models.qwen3 import DEFAULT_INSTRUCTION, PREFIX, SUFFIX  # the template's words must tokenize sanely

    vocab_words = words()
    corpus = [" " + " ".join(vocab_words[i:i + 50]) for i in range(0, len(vocab_words), 50)]
    corpus += ["yes", "no", PREFIX, SUFFIX, DEFAULT_INSTRUCTION, "<Instruct>: <Query>: <Document>:"]
    tok = _train_bpe(corpus, QWEN_SPECIALS, add_prefix_space=False)
    _check_one_token_per_word(tok, vocab_words)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=QWEN_SPECIALS[1:], model_max_length=131072,
                                   padding_side="left")


def build_ettin(path: Path, name: str, seed: int = 0) -> Path:
    from sentence_transformers import CrossEncoder
    from sentence_transformers.base.modules import Dense, Transformer
    from sentence_transformers.sentence_transformer.modules import LayerNorm, Pooling
    from transformers import ModernBertModel

    torch.manual_seed(seed)
    tok = modernbert_tokenizer()
    cfg = ettin_config(name, pad_token_id=tok.pad_token_id, cls_token_id=tok.cls_token_id,
                       sep_token_id=tok.sep_token_id, bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id)
    backbone = path.parent / (path.name + "_backbone")
    ModernBertModel(cfg).save_pretrained(backbone)
    tok.save_pretrained(backbone)
    h = cfg.hidden_size
    modules = [Transformer(str(backbone)), Pooling(h, "cls"), Dense(h, h, activation_function=torch.nn.GELU()),
               LayerNorm(h), Dense(h, 1, activation_function=torch.nn.Identity(), module_output_name="scores")]
    CrossEncoder(modules=modules, activation_fn=torch.nn.Identity()).save(str(path))
    shutil.rmtree(backbone)  # the cross-encoder directory holds its own copy of the backbone
    return path


def build_qwen3(path: Path, seed: int = 0, shape: dict = QWEN3_06B) -> Path:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    tok = qwen_tokenizer()
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


def build(name: str, root: Path) -> Path:
    """The model directory of `name` under `root`, built once (reused when already complete)."""
    path = Path(root) / name
    marker = path / ".complete"
    if marker.exists():
        return path
    if name in ("ettin-17m", "ettin-150m"):
        build_ettin(path, name)
    elif name == "qwen3-0.6b":
        build_qwen3(path)
    elif name == "qwen3-small":
        build_qwen3(path, shape=QWEN3_SMALL)
    else:
        raise ValueError(f"unknown benchmark model {name!r}; choose from {MODELS + ('qwen3-small',)}")
    marker.write_text("ok")
    return path
