"""mixedbread-ai mxbai-rerank-v2 (base, large): a plain Qwen2ForCausalLM scored as the `mxbai-rerank` package's
`MxbaiRerankV2` does, without its normalisation: raw = logit("1") - logit("0") at the last token.

Input, assembled from separately tokenized pieces (no special tokens added):
    prefix + query' + "\\n" + document' + "\\n" + task prompt + suffix
query' = "query: {q}" (or "instruction: {i}\\nquery: {q}"), cut to 3/4 of the content length L; document' =
"document: {d}", cut to min(L, positions - |query'| - |fixed pieces|); then "\\n" + document' is cut so that query'
+ "\\n" + document' fits L. L = max input length - |fixed pieces| (the package's max_length, default 8192).
Cuts keep the start (Right) or the end (Left) of a piece, as the package's tokenizer `truncation_side` does.

No sentence-transformers config names the model a reranker: it is recognised by its name (the registry's
`model_names`).
"""
from __future__ import annotations

import re
from pathlib import Path

from ..causal_lm import CausalLMScorer, PiecesEncoder, cut_second, keep
from ..config import load_config, position_limit, resolve_max_length
from ..encoded import EncodedBatch
from ..encoding import DocumentSlot, check_items
from ..errors import InputTooLongError, ModelLoadError
from ..tokenization import load_tokenizer
from . import Family

NAME = "mxbai"
# MxbaiRerankV2's fixed texts (mxbai-rerank 0.1.6).
SEP = "\n"
DOC_FORMAT = "document: {}"
PREFIX = ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
          "<|im_start|>user\n")
SUFFIX = "<|im_end|>\n<|im_start|>assistant\n"
TASK_PROMPT = ("You are a search relevance expert who evaluates how well documents match search queries. For each "
               "query-document pair, carefully analyze the semantic relationship between them, then provide your "
               "binary relevance judgment (0 for not relevant, 1 for relevant).\nRelevance:")
DEFAULT_CONTENT_LENGTH = 8192  # the package's max_length default
NAMES = re.compile(r"mxbai-rerank-[a-z0-9]+-v2")


def _detect(files) -> bool:
    return "Qwen2ForCausalLM" in files.architectures and any(NAMES.fullmatch(n) for n in files.names)


def query_text(query: str, instruction: str | None) -> str:
    text = f"query: {query}"
    return f"instruction: {instruction}{SEP}{text}" if instruction else text


class MxbaiEncoder(PiecesEncoder):
    default_instruction = None

    def __init__(self, *, positions: int, **kw):
        super().__init__(**kw)
        self.prefix_ids, self.sep_ids = self._piece(PREFIX), self._piece(SEP)
        self.tail_ids = self.sep_ids + self._piece(TASK_PROMPT) + self._piece(SUFFIX)
        self.fixed = len(self.prefix_ids) + len(self.tail_ids)
        self.content_length = self.max_length - self.fixed  # the package's max_length
        self.positions = positions  # the package's model_max_length (max_position_embeddings)
        if self.content_length < 4:
            raise ModelLoadError(self.model_id, f"max_length {self.max_length} leaves no room for a query and a "
                                                f"document after the prompt's {self.fixed} fixed tokens")

    def query_text(self, query, instruction):
        return query_text(query, instruction)

    def doc_text(self, doc):
        return DOC_FORMAT.format(doc)

    def _assemble(self, q_enc, d_enc, truncate, direction, instruction):
        length = self.content_length
        ids, cuts = [], []
        for i, (q, d) in enumerate(zip(q_enc, d_enc)):
            q_ids = keep(q.ids, length * 3 // 4, direction)
            d_ids = keep(d.ids, min(self.positions - len(q_ids) - self.fixed, length), direction)
            second = cut_second(len(q_ids), self.sep_ids + d_ids, length, direction)  # the package's cut of the pair
            cut = len(q_ids) < len(q.ids) or len(d_ids) < len(d.ids) or len(second) < len(self.sep_ids) + len(d_ids)
            if cut and not truncate:
                raise InputTooLongError(
                    f"input {i} is longer than the model takes ({self.max_length} tokens with its prompt; the query "
                    f"at most {length * 3 // 4}); shorten it or send truncate=true", index=i)
            ids.append(self.prefix_ids + q_ids + second + self.tail_ids)
            cuts.append(cut)
        return EncodedBatch.from_lists(ids), cuts

    def document_slot(self, query, query_tokens, instruction=None):
        """prefix + tokens of the query piece (q decoded back from its kept tokens) + "\\n" + tokens of "document: "
        | window | "\\n" + task prompt + suffix: the package's separately tokenized pieces (docs/API.md)."""
        check_items(self, (), instruction)
        q_ids = self._piece(query_text(self.kept_query(query, query_tokens), instruction))
        return DocumentSlot(self.prefix_ids + q_ids + self.sep_ids + self._piece(DOC_FORMAT.format("")),
                            list(self.tail_ids))


def _encoder(model_id: str, model_dir: Path, config, max_length: int | None) -> MxbaiEncoder:
    tok = load_tokenizer(model_id, model_dir, config)
    positions = position_limit(config)
    if positions is None:
        raise ModelLoadError(model_id, "config.json has no max_position_embeddings", file="config.json")
    fixed = sum(len(tok.encode(t, add_special_tokens=False)) for t in (PREFIX, SEP, TASK_PROMPT, SUFFIX))
    limit = resolve_max_length(model_id, configured=max_length, file_configured=None, tokenizer_max=None,
                               pos_limit=positions, default=DEFAULT_CONTENT_LENGTH + fixed)
    return MxbaiEncoder(family=NAME, model_id=model_id, tokenizer=tok, max_length=limit, id2label={0: "LABEL_0"},
                        positions=positions)


def load_encoder(model_id: str, model_dir: Path, *, max_length: int | None = None) -> MxbaiEncoder:
    return _encoder(model_id, model_dir, load_config(model_id, model_dir), max_length)


def one_zero_ids(model_id: str, tokenizer) -> list[int]:
    """The package's score tokens: the first token of "1" and of "0"."""
    ids = [tokenizer.encode(t, add_special_tokens=False) for t in ("1", "0")]
    if not all(ids):
        raise ModelLoadError(model_id, "the tokenizer encodes '1' / '0' to nothing")
    return [ids[0][0], ids[1][0]]


class MxbaiScorer(CausalLMScorer):
    def __init__(self, model_id: str, model_dir: Path, *, max_length: int | None, **kw):
        config = load_config(model_id, model_dir)
        encoder = _encoder(model_id, model_dir, config, max_length)
        super().__init__(NAME, model_id, model_dir, config, encoder, one_zero_ids(model_id, encoder.tokenizer), **kw)

    def combine(self, logits):
        return logits[:, 0] - logits[:, 1]  # logit("1") - logit("0")


FAMILY = Family(name=NAME, detect=_detect, load_encoder=load_encoder, scorer=MxbaiScorer,
                supports="mxbai-rerank-v2 (Qwen2ForCausalLM named mxbai-rerank-*-v2)")
