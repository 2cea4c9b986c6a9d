"""Qwen3-Reranker from the official `Qwen3ForCausalLM` checkpoints: raw score = logit("yes") − logit("no") of the
last token, from two rows of the output weights (models/causal_lm.py), never the vocabulary projection. W is
lm_head.weight, or the input embedding when tie_word_embeddings is true (0.6B, 4B; not 8B).
"""
from __future__ import annotations

from pathlib import Path

from ..causal_lm import CausalLMScorer
from ..config import load_config, position_limit, resolve_max_length
from ..encoded import EncodedBatch
from ..encoding import DocumentSlot, Encoder, backend_copy
from ..errors import InputTooLongError, ModelLoadError
from ..tokenization import load_tokenizer
from . import Family

# The official recipe (Qwen/Qwen3-Reranker-* model cards).
PREFIX = ('<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the '
          'Instruct provided. Note that the answer can only be "yes" or "no".<|im_end|>\n<|im_start|>user\n')
SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
DEFAULT_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"
DEFAULT_MAX_LENGTH = 8192


def format_content(instruction: str, query: str, doc: str) -> str:
    return f"<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {doc}"


class Qwen3Encoder(Encoder):
    """prefix + "<Instruct>: …\\n<Query>: …\\n<Document>: …" + suffix; only the content between the fixed prefix and
    suffix is truncated, to max_length − len(prefix) − len(suffix) tokens (as the recipe's tokenizer call does)."""

    accepts_single = False
    accepts_instruction = True
    shares_prefix = True
    default_instruction = DEFAULT_INSTRUCTION

    def __init__(self, **kw):
        super().__init__(**kw)
        tok = self.tokenizer
        self.prefix_ids = tok.encode(PREFIX, add_special_tokens=False)
        self.suffix_ids = tok.encode(SUFFIX, add_special_tokens=False)
        self.content_budget = self.max_length - len(self.prefix_ids) - len(self.suffix_ids)
        backend = tok.backend_tokenizer
        self._full = backend_copy(backend, None)
        self._cut = ({d: backend_copy(backend, self.content_budget, d) for d in ("right", "left")}
                     if self.content_budget >= 1 else None)

    def encode(self, items, *, truncate=True, direction="right", instruction=None, max_tokens_per_doc=None):
        direction, queries, docs = self.prompt_pairs(items, direction, instruction, max_tokens_per_doc)
        if self._cut is None:
            raise InputTooLongError(
                f"the prompt prefix and suffix alone take {len(self.prefix_ids) + len(self.suffix_ids)} tokens, "
                f"not fewer than the max input length {self.max_length}; raise max_length")
        instruction = self.default_instruction if instruction is None else instruction
        contents = [format_content(instruction, q, d) for q, d in zip(queries, docs)]
        tok = self._cut[direction] if truncate else self._full
        # add_special_tokens as the recipe's tokenizer call (Qwen adds none).
        encodings = tok.encode_batch(contents, add_special_tokens=True)
        fixed = len(self.prefix_ids) + len(self.suffix_ids)
        ids = []
        for i, e in enumerate(encodings):
            if not truncate and len(e.ids) + fixed > self.max_length:
                raise InputTooLongError(
                    f"input {i} has {len(e.ids) + fixed} tokens after templating, more than the model's maximum "
                    f"of {self.max_length}; shorten it or send truncate=true", index=i)
            ids.append(self.prefix_ids + e.ids + self.suffix_ids)
        return EncodedBatch.from_lists(ids)

    def document_slot(self, query, query_tokens, instruction=None):
        """prefix + tokens of "<Instruct>: …\\n<Query>: {q}\\n<Document>: " as one piece | window | suffix (docs/API.md),
        q decoded back from the query's first `query_tokens` tokens when it has more."""
        query = self.kept_query(query, query_tokens)
        instruction = self.default_instruction if instruction is None else instruction
        piece = self.plain_tokenizer().encode(format_content(instruction, query, ""), add_special_tokens=False).ids
        return DocumentSlot(self.prefix_ids + piece, list(self.suffix_ids))


def _encoder(model_id: str, model_dir: Path, config, max_length: int | None) -> Qwen3Encoder:
    tok = load_tokenizer(model_id, model_dir, config)
    limit = resolve_max_length(model_id, configured=max_length, file_configured=None, tokenizer_max=None,
                               pos_limit=position_limit(config), default=DEFAULT_MAX_LENGTH)
    return Qwen3Encoder(family="qwen3", model_id=model_id, tokenizer=tok, max_length=limit,
                        id2label={0: "LABEL_0"})  # the official checkpoints carry no labels


def load_encoder(model_id: str, model_dir: Path, *, max_length: int | None = None) -> Qwen3Encoder:
    return _encoder(model_id, model_dir, load_config(model_id, model_dir), max_length)


def yes_no_ids(model_id: str, tokenizer) -> tuple[int, int]:
    ids = tokenizer.convert_tokens_to_ids(["yes", "no"])
    if any(i is None or i == tokenizer.unk_token_id for i in ids):
        raise ModelLoadError(model_id, "the tokenizer has no single 'yes' / 'no' tokens; not a yes/no reranker")
    return int(ids[0]), int(ids[1])


class Qwen3Scorer(CausalLMScorer):
    def __init__(self, model_id: str, model_dir: Path, *, max_length: int | None, **kw):
        config = load_config(model_id, model_dir)
        encoder = _encoder(model_id, model_dir, config, max_length)
        super().__init__("qwen3", model_id, model_dir, config, encoder, yes_no_ids(model_id, encoder.tokenizer), **kw)

    def combine(self, logits):
        return logits[:, 0] - logits[:, 1]  # logit("yes") - logit("no")


def _detect(files) -> bool:
    return "Qwen3ForCausalLM" in files.architectures


FAMILY = Family(name="qwen3", detect=_detect, load_encoder=load_encoder, scorer=Qwen3Scorer,
                supports="Qwen3ForCausalLM (Qwen3-Reranker)")
