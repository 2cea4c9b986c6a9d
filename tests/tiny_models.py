"""Tiny random-weight rerankers saved in the exact on-disk layouts of the real checkpoints.

Every builder writes a directory that the real loading code reads unchanged, and that the reference
implementations (sentence-transformers, transformers) load too. Tokenizers are trained here, in a
second, with `tokenizers`; nothing touches the network.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from benchmarks.build import save_qwen3_reranker

# Enough variety to train a vocabulary that covers the test texts, non-ASCII included.
CORPUS = [
    "what is the capital of france",
    "paris is the capital and most populous city of france",
    "the quick brown fox jumps over the lazy dog",
    "how many people live in berlin",
    "berlin has a population of about 3.7 million inhabitants",
    "machine learning models rank documents by relevance",
    "héllo wörld ünïcode café naïve résumé",
    "北京是中国的首都 東京は日本の首都です",
    "Москва столица России",
    "yes no yes no maybe",
    "Judge whether the Document meets the requirements based on the Query and the Instruct provided.",
    'Note that the answer can only be "yes" or "no".',
    "Given a web search query, retrieve relevant passages that answer the query",
    "Instruct Query Document system user assistant",
] * 20

# Texts used by parity tests: short, long enough to be truncated, empty-ish, non-ASCII.
QUERIES = ["what is the capital of france", "how many people live in berlin", "café naïve", "北京 東京"]
DOCS = [
    "paris is the capital and most populous city of france",
    "berlin has a population of about 3.7 million inhabitants " * 12,
    "the quick brown fox",
    "héllo wörld ünïcode résumé Москва столица России",
    "",
    "machine learning models rank documents by relevance " * 20,
]


def _wordpiece_tokenizer(model_max_length: int) -> PreTrainedTokenizerFast:
    """BERT-style: WordPiece, lower-casing normaliser, [CLS] A [SEP] B [SEP] with token types."""
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(CORPUS, trainers.WordPieceTrainer(
        vocab_size=400, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    tok.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]", model_max_length=model_max_length,
        # As BertTokenizer declares: without it the saved tokenizer returns no token_type_ids at all.
        model_input_names=["input_ids", "token_type_ids", "attention_mask"])


def _modernbert_tokenizer(model_max_length: int) -> PreTrainedTokenizerFast:
    """ModernBERT-style: byte-level BPE with [CLS] A [SEP] B [SEP], no token types."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=500, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]", model_max_length=model_max_length)


def _xlmr_tokenizer(model_max_length: int) -> PreTrainedTokenizerFast:
    """XLM-R-style: Unigram with <s> A </s></s> B </s>, pad id 1."""
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(CORPUS, trainers.UnigramTrainer(
        vocab_size=400, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"], unk_token="<unk>"))
    bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>",
        special_tokens=[("<s>", bos), ("</s>", eos)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        cls_token="<s>", sep_token="</s>", mask_token="<mask>", model_max_length=model_max_length)


# Larger than the usual 0.02 so random models give scores that differ clearly between pairs.
INIT = 0.2

QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]


def _qwen_tokenizer() -> PreTrainedTokenizerFast:
    """Qwen2-style byte-level BPE, no post-processor (no BOS/EOS added), ChatML specials, pad on the left."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=600, special_tokens=QWEN_SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        additional_special_tokens=QWEN_SPECIALS[1:], model_max_length=131072, padding_side="left")


def _seed(seed: int) -> None:
    torch.manual_seed(seed)


def _tiny_modernbert_config(vocab_size: int, tok, layout: str = "layer_types", **kw):
    from transformers import ModernBertConfig
    cfg = ModernBertConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=2,
        max_position_embeddings=256, pad_token_id=tok.pad_token_id, cls_token_id=tok.cls_token_id,
        sep_token_id=tok.sep_token_id, bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id,
        global_attn_every_n_layers=3, local_attention=8, initializer_range=INIT, **kw)
    # ettin: rope theta 160000 for global AND local layers.
    cfg.rope_parameters = {"full_attention": {"rope_type": "default", "rope_theta": 160000.0},
                           "sliding_attention": {"rope_type": "default", "rope_theta": 160000.0}}
    return cfg


def _to_legacy_modernbert_config(path: Path) -> None:
    """Rewrite a saved ModernBERT config.json into the pre-transformers-5 layout (global/local rope thetas)."""
    cfg = json.loads((path / "config.json").read_text())
    rope = cfg.pop("rope_parameters")
    cfg.pop("layer_types", None)
    cfg["global_rope_theta"] = rope["full_attention"]["rope_theta"]
    cfg["local_rope_theta"] = rope["sliding_attention"]["rope_theta"]
    (path / "config.json").write_text(json.dumps(cfg, indent=2))


def build_modular(path: str | os.PathLike, *, legacy: bool = False, pooling: str = "cls",
                  activation: str = "gelu", seed: int = 0, model_max_length: int = 64) -> Path:
    """ettin-style modular cross-encoder: ModernBertModel -> Pooling -> Dense -> LayerNorm -> Dense('scores').

    legacy=True rewrites module strings to `sentence_transformers.models.X`, the pooling config to the
    `pooling_mode_*` booleans with `word_embedding_dimension`, and the backbone config to the old rope layout.
    """
    from sentence_transformers import CrossEncoder
    from sentence_transformers.base.modules import Dense, Transformer
    from sentence_transformers.sentence_transformer.modules import LayerNorm, Pooling
    from transformers import ModernBertModel

    path = Path(path)
    _seed(seed)
    tok = _modernbert_tokenizer(model_max_length)
    cfg = _tiny_modernbert_config(len(tok), tok)
    backbone_dir = path.parent / (path.name + "_backbone")
    ModernBertModel(cfg).save_pretrained(backbone_dir)
    tok.save_pretrained(backbone_dir)
    act = {"gelu": torch.nn.GELU(), "tanh": torch.nn.Tanh(), "identity": torch.nn.Identity()}[activation]
    h = cfg.hidden_size
    modules = [Transformer(str(backbone_dir)), Pooling(h, pooling), Dense(h, h, activation_function=act),
               LayerNorm(h), Dense(h, 1, activation_function=torch.nn.Identity(), module_output_name="scores")]
    ce = CrossEncoder(modules=modules, activation_fn=torch.nn.Identity())
    # Random LayerNorm affine parameters so the test sees a head that is not the identity.
    with torch.no_grad():
        ce[3].norm.weight.uniform_(0.5, 1.5)
        ce[3].norm.bias.uniform_(-0.5, 0.5)
    ce.save(str(path))
    if legacy:
        _legacy_layout(path)
    return path


_LEGACY_TYPES = {
    "Transformer": "sentence_transformers.models.Transformer",
    "Pooling": "sentence_transformers.models.Pooling",
    "Dense": "sentence_transformers.models.Dense",
    "LayerNorm": "sentence_transformers.models.LayerNorm",
}


def _legacy_layout(path: Path) -> None:
    mods = json.loads((path / "modules.json").read_text())
    for m in mods:
        m["type"] = _LEGACY_TYPES[m["type"].rsplit(".", 1)[-1]]
        if m["type"].endswith("Pooling"):
            pc = json.loads((path / m["path"] / "config.json").read_text())
            mode = pc.pop("pooling_mode")
            legacy = {"word_embedding_dimension": pc.pop("embedding_dimension")}
            for flag, name in [("pooling_mode_cls_token", "cls"), ("pooling_mode_mean_tokens", "mean"),
                               ("pooling_mode_max_tokens", "max"), ("pooling_mode_mean_sqrt_len_tokens", None),
                               ("pooling_mode_weightedmean_tokens", None), ("pooling_mode_lasttoken", "lasttoken")]:
                legacy[flag] = mode == name
            legacy.update(pc)
            (path / m["path"] / "config.json").write_text(json.dumps(legacy, indent=2))
    (path / "modules.json").write_text(json.dumps(mods, indent=2))
    _to_legacy_modernbert_config(path)


def build_bert_seq_cls(path: str | os.PathLike, *, seed: int = 1, id2label: dict | None = None) -> Path:
    """ms-marco-MiniLM-style BertForSequenceClassification with token_type_ids, one label."""
    from transformers import BertConfig, BertForSequenceClassification
    path = Path(path)
    _seed(seed)
    tok = _wordpiece_tokenizer(model_max_length=64)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                     num_attention_heads=2, max_position_embeddings=128, type_vocab_size=2,
                     pad_token_id=tok.pad_token_id, num_labels=1, initializer_range=INIT)
    if id2label:
        cfg.id2label = id2label
        cfg.label2id = {v: k for k, v in id2label.items()}
    BertForSequenceClassification(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def build_xlmr_seq_cls(path: str | os.PathLike, *, seed: int = 2) -> Path:
    """bge-reranker-style XLMRobertaForSequenceClassification: positions start at pad_id + 1."""
    from transformers import XLMRobertaConfig, XLMRobertaForSequenceClassification
    path = Path(path)
    _seed(seed)
    tok = _xlmr_tokenizer(model_max_length=64)  # = max_position_embeddings - pad_token_id - 1, as bge ships
    cfg = XLMRobertaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                           num_attention_heads=2, max_position_embeddings=66, type_vocab_size=1,
                           pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                           eos_token_id=tok.eos_token_id, num_labels=1, initializer_range=INIT)
    XLMRobertaForSequenceClassification(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def build_modernbert_seq_cls(path: str | os.PathLike, *, seed: int = 3, pooling: str = "mean") -> Path:
    """gte-reranker-modernbert-style ModernBertForSequenceClassification (mean classifier pooling; or cls)."""
    from transformers import ModernBertForSequenceClassification
    path = Path(path)
    _seed(seed)
    tok = _modernbert_tokenizer(model_max_length=128)
    cfg = _tiny_modernbert_config(len(tok), tok, classifier_pooling=pooling, num_labels=1)
    ModernBertForSequenceClassification(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def build_qwen3_reranker(path: str | os.PathLike, *, tied: bool = True, seed: int = 4) -> Path:
    """Qwen3-Reranker in the official layout: Qwen3ForCausalLM, no id2label/label2id, ChatML tokenizer."""
    from transformers import Qwen3Config, Qwen3ForCausalLM
    path = Path(path)
    _seed(seed)
    tok = _qwen_tokenizer()
    assert len(tok.tokenize("yes")) == 1 and len(tok.tokenize("no")) == 1
    cfg = Qwen3Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=512,
                      tie_word_embeddings=tied, bos_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                      initializer_range=INIT)
    model = Qwen3ForCausalLM(cfg)
    if not tied:  # make the untied head clearly different from the embedding
        with torch.no_grad():
            model.lm_head.weight.normal_(0, 0.5)
    return save_qwen3_reranker(model, tok, path)


BUILDERS = {
    "modular": lambda p: build_modular(p),
    "modular_legacy": lambda p: build_modular(p, legacy=True),
    "modular_mean_tanh": lambda p: build_modular(p, pooling="mean", activation="tanh", seed=5),
    "bert": lambda p: build_bert_seq_cls(p),
    "xlmr": lambda p: build_xlmr_seq_cls(p),
    "modernbert_cls": lambda p: build_modernbert_seq_cls(p),
    "modernbert_cls_pooling": lambda p: build_modernbert_seq_cls(p, pooling="cls", seed=7),
    "qwen3_tied": lambda p: build_qwen3_reranker(p, tied=True),
    "qwen3_untied": lambda p: build_qwen3_reranker(p, tied=False, seed=6),
}


def build_all(root: str | os.PathLike) -> dict[str, Path]:
    root = Path(root)
    return {name: build(root / name) for name, build in BUILDERS.items()}


def cached_scorers(dirs: dict[str, Path], **defaults):
    """get(name, **kw): the fp32 CPU scorer of `dirs[name]` loaded with `defaults` and `kw`, once per settings."""
    from models import load_scorer

    cache = {}

    def get(name: str, **kw):
        kw = {**defaults, **kw}
        key = (name, tuple(sorted(kw.items())))
        if key not in cache:
            cache[key] = load_scorer(str(dirs[name]), dtype="float32", device="cpu", **kw)
        return cache[key]
    return get
