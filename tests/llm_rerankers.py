"""Tiny random-weight causal-LM rerankers in their real on-disk layouts (built by the tests, no network):
Sentence Transformers causal CrossEncoders (saved by sentence-transformers itself), mxbai-rerank-v2 (a plain
Qwen2ForCausalLM) and bge-reranker-v2-gemma (a plain GemmaForCausalLM)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from tests.tiny_models import INIT, _qwen_tokenizer

# A Qwen3-Reranker-style template over the roles sentence-transformers maps a pair to (flat message contents).
FLAT_TEMPLATE = (
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the Instruct "
    "provided. Note that the answer can only be \"yes\" or \"no\".<|im_end|>\n<|im_start|>user\n<Instruct>: "
    "{{ (messages | selectattr('role', 'eq', 'system') | map(attribute='content') | first) or "
    "'Given a web search query, retrieve relevant passages that answer the query' }}\n"
    "<Query>: {{ messages | selectattr('role', 'eq', 'query') | map(attribute='content') | first }}\n"
    "<Document>: {{ messages | selectattr('role', 'eq', 'document') | map(attribute='content') | first }}"
    "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")

# Structured contents ([{"type": "text", "text": ...}]), the system message as a leading turn, and a template
# variable that processing_kwargs["chat_template"] sets.
STRUCTURED_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content[0].text }}<|im_end|>\n{% endfor %}"
    "<|im_start|>assistant\n{{ answer_prefix | default('no') }}: ")


def _qwen3_lm(tok, *, tied: bool, seed: int):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen3Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=512,
                      tie_word_embeddings=tied, initializer_range=INIT, pad_token_id=tok.pad_token_id,
                      eos_token_id=tok.eos_token_id)
    model = Qwen3ForCausalLM(cfg)
    if not tied:
        with torch.no_grad():
            model.lm_head.weight.normal_(0, 0.5)
    return model


def build_st_causal(path: str | os.PathLike, *, variant: str = "flat", seed: int = 11) -> Path:
    """A causal CrossEncoder saved by sentence-transformers (modules.json = Transformer + LogitScore).

    flat: tied Qwen3, yes/no tokens, the template's own default instruction, max length 96.
    structured: untied Qwen3, only a true token (false_token_id null), a saved default prompt, a template
    variable from processing_kwargs, max length 80.
    gemma2: a Gemma2 backbone (final logit soft-capping) with a Gemma tokenizer, first tokens of "yes" / "no".
    """
    if variant == "gemma2":
        return _build_st_causal_gemma2(Path(path), seed)
    from sentence_transformers import CrossEncoder
    from sentence_transformers.base.modules import Transformer
    from sentence_transformers.cross_encoder.modules import LogitScore

    path = Path(path)
    tok = _qwen_tokenizer()
    structured = variant == "structured"
    tok.chat_template = STRUCTURED_TEMPLATE if structured else FLAT_TEMPLATE
    base = path.parent / (path.name + "_base")
    _qwen3_lm(tok, tied=not structured, seed=seed).save_pretrained(base)
    tok.save_pretrained(base)
    yes, no = tok.convert_tokens_to_ids(["yes", "no"])
    if structured:
        transformer = Transformer(str(base), transformer_task="text-generation", max_seq_length=80,
                                  processing_kwargs={"chat_template": {"answer_prefix": "yes"}})
        model = CrossEncoder(modules=[transformer, LogitScore(true_token_id=yes, false_token_id=None)],
                             prompts={"web": "Given a web search query, retrieve relevant passages",
                                      "short": "judge"}, default_prompt_name="web")
    else:
        transformer = Transformer(str(base), transformer_task="text-generation", max_seq_length=96)
        model = CrossEncoder(modules=[transformer, LogitScore(true_token_id=yes, false_token_id=no)])
    model.save(str(path))
    shutil.rmtree(base)
    return path


def _bpe_tokenizer(extra_corpus: list[str], specials: list[str], **kw):
    """Byte-level BPE trained on the test corpus plus a family's fixed texts (so its prompts stay short)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from tests.tiny_models import CORPUS

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS + extra_corpus * 20, trainers.BpeTrainer(
        vocab_size=700, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, **kw)


def build_mxbai(path: str | os.PathLike, *, seed: int = 21, extra_positions: int = 80, tied: bool = True) -> Path:
    """mxbai-rerank-v2's layout: a plain Qwen2ForCausalLM with a Qwen2 (ChatML) tokenizer; the folder name is what
    marks it (base-v2 ties its output weights, large-v2 does not). max_position_embeddings = the prompt's fixed
    tokens + `extra_positions`, so the package's position-limit rule for the document cut is exercised."""
    return _build_mxbai(path, seed=seed, extra_positions=extra_positions, tied=tied)


def _build_mxbai(path, *, seed: int, extra_positions: int, tied: bool) -> Path:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from models.families.mxbai import PREFIX, SEP, SUFFIX, TASK_PROMPT

    path = Path(path)
    tok = _bpe_tokenizer([PREFIX, SUFFIX, TASK_PROMPT, "query: document: instruction: 0 1"],
                         ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], eos_token="<|im_end|>",
                         pad_token="<|endoftext|>", additional_special_tokens=["<|im_start|>", "<|im_end|>"],
                         model_max_length=32768)
    fixed = sum(len(tok.encode(t, add_special_tokens=False)) for t in (PREFIX, SEP, TASK_PROMPT, SUFFIX))
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=fixed + extra_positions,
                      tie_word_embeddings=tied, initializer_range=INIT, bos_token_id=tok.pad_token_id,
                      eos_token_id=tok.eos_token_id)
    model = Qwen2ForCausalLM(cfg)
    if not tied:
        with torch.no_grad():
            model.lm_head.weight.normal_(0, 0.5)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _gemma_tokenizer(extra_corpus: list[str]):
    """A GemmaTokenizer (BPE with byte fallback, spaces as ▁, BOS added) over a vocabulary trained here."""
    import json

    from tokenizers import Tokenizer, models, normalizers, trainers
    from transformers import GemmaTokenizer

    from tests.tiny_models import CORPUS

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"] + [f"<0x{i:02X}>" for i in range(256)]
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.train_from_iterator(CORPUS + extra_corpus * 20, trainers.BpeTrainer(vocab_size=900, special_tokens=specials))
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    return GemmaTokenizer(vocab=model["vocab"], merges=merges)


def build_bge_gemma(path: str | os.PathLike, *, seed: int = 31, positions: int = 1024, tied: bool = True,
                    model_max_length: int | None = None) -> Path:
    """bge-reranker-v2-gemma's layout: a plain GemmaForCausalLM (multi-query attention) and a Gemma tokenizer; the
    folder name is what marks it. `model_max_length`: a real limit saved with the tokenizer (default: none, as the
    published tokenizer_config.json's placeholder)."""
    from transformers import GemmaConfig, GemmaForCausalLM

    from models.families.bge_gemma import DEFAULT_PROMPT

    path = Path(path)
    tok = _gemma_tokenizer([DEFAULT_PROMPT, "A: B: Yes No"])
    torch.manual_seed(seed)
    cfg = GemmaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=1, head_dim=8, max_position_embeddings=positions,
                      tie_word_embeddings=tied, initializer_range=INIT, pad_token_id=tok.pad_token_id,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model = GemmaForCausalLM(cfg)
    if not tied:
        with torch.no_grad():
            model.lm_head.weight.normal_(0, 0.5)
    model.save_pretrained(path)
    if model_max_length is not None:
        tok.model_max_length = model_max_length
    tok.save_pretrained(path)
    return path


def _build_st_causal_gemma2(path: Path, seed: int) -> Path:
    from sentence_transformers import CrossEncoder
    from sentence_transformers.base.modules import Transformer
    from sentence_transformers.cross_encoder.modules import LogitScore
    from transformers import Gemma2Config, Gemma2ForCausalLM

    tok = _gemma_tokenizer([FLAT_TEMPLATE, "yes no"])
    tok.chat_template = FLAT_TEMPLATE
    torch.manual_seed(seed)
    # A soft cap small enough that the tiny model's logits reach it: the score must apply it as the lm_head does.
    cfg = Gemma2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=512,
                       initializer_range=INIT, final_logit_softcapping=1.5, attn_logit_softcapping=None,
                       pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    base = path.parent / (path.name + "_base")
    Gemma2ForCausalLM(cfg).save_pretrained(base)
    tok.save_pretrained(base)
    yes, no = (tok.encode(t, add_special_tokens=False)[0] for t in ("yes", "no"))
    transformer = Transformer(str(base), transformer_task="text-generation", max_seq_length=64)
    CrossEncoder(modules=[transformer, LogitScore(true_token_id=yes, false_token_id=no)]).save(str(path))
    shutil.rmtree(base)
    return path


JINA_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>", "<|embed_token|>",
                 "<|rerank_token|>"]


def build_jina_v3(path: str | os.PathLike, *, seed: int = 41, model_max_length: int = 131072,
                  remote_code_trap: bool = True) -> Path:
    """jina-reranker-v3's layout (benchmarks.build.save_jina_reranker): config.json with architectures
    ["JinaForRanking"] (model_type qwen3, an auto_map to the repository's modeling.py), ONE model.safetensors holding
    the Qwen3 backbone as `model.*` and the projector `projector.0.weight` [H/2, H], `projector.2.weight` [P, H/2]
    (no lm_head: the model's is the identity), and a ChatML tokenizer whose added tokens include the two markers.
    131072 positions, as the real config.

    remote_code_trap: the modeling.py written next to it raises on import, so a loader that ran the repository's
    code would fail."""
    from transformers import Qwen3Config, Qwen3Model

    from benchmarks.build import save_jina_reranker
    from models.families.jina_v3 import DOC_MARKER, QUERY_MARKER, SUFFIX, SYSTEM, block_prompt

    path = Path(path)
    fixed = block_prompt("query", ["passage"], "instruct") + SYSTEM + SUFFIX
    tok = _bpe_tokenizer([fixed, "I will provide you with passages, each indicated by a numerical identifier."],
                         JINA_SPECIALS, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                         additional_special_tokens=JINA_SPECIALS[1:], model_max_length=model_max_length)
    assert len(tok.tokenize(DOC_MARKER)) == 1 and len(tok.tokenize(QUERY_MARKER)) == 1
    torch.manual_seed(seed)
    cfg = Qwen3Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=131072,
                      tie_word_embeddings=True, initializer_range=INIT, bos_token_id=tok.pad_token_id,
                      eos_token_id=tok.eos_token_id, use_cache=False)
    save_jina_reranker(Qwen3Model(cfg), (torch.randn(16, 32) * 0.3, torch.randn(12, 16) * 0.3), tok, path)
    if remote_code_trap:
        (path / "modeling.py").write_text('raise RuntimeError("the repository\'s own code must never run")\n')
    return path
