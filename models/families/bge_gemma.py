"""BAAI/bge-reranker-v2-gemma: a plain GemmaForCausalLM scored as FlagEmbedding's `FlagLLMReranker` does with
normalize=False: raw = logit("Yes") at the last token.

Input, from separately tokenized pieces (no special tokens added by the tokenizer):
    [bos] + "A: {query}" + "\\n" + "B: {passage}" + "\\n" + prompt
"A: {query}" is cut to 3/4 of the passage length L and "B: {passage}" to L; then "\\n" + "B: ..." is cut so the
part before the last "\\n" fits L + |"\\n"| + |prompt|. L is FlagEmbedding's `max_length`. Our max input length
(docs/API.md) counts the whole input with the default prompt, so L = max input length − 2 × (|"\\n"| + |default
prompt|); the max input length is the smaller of the tokenizer's real `model_max_length` and the position limit,
or, with no real tokenizer limit, FlagEmbedding's default L of 512 plus that overhead.
Cuts keep the start (Right) or the end (Left) of a piece, as the tokenizer's `truncation_side` does.
A request's `instruction` replaces the prompt (FlagEmbedding's `prompt`).

No sentence-transformers config names the model a reranker: it is recognised by its name (the registry's
`model_names`).
"""
from __future__ import annotations

import re
from pathlib import Path

from ..causal_lm import CausalLMScorer, PiecesEncoder, cut_second, keep
from ..config import load_config, position_limit, real_tokenizer_limit, resolve_max_length
from ..encoded import EncodedBatch
from ..encoding import DocumentSlot, check_items
from ..errors import InputTooLongError, ModelLoadError
from ..tokenization import load_tokenizer
from . import Family

NAME = "bge_gemma"
SEP = "\n"
DEFAULT_PROMPT = ("Given a query A and a passage B, determine whether the passage contains an answer to the query by "
                  "providing a prediction of either 'Yes' or 'No'.")
QUERY_FORMAT, PASSAGE_FORMAT = "A: {}", "B: {}"
DEFAULT_PASSAGE_LENGTH = 512  # FlagLLMReranker's max_length default
NAMES = re.compile(r"bge-reranker-v2-gemma")


def _detect(files) -> bool:
    return "GemmaForCausalLM" in files.architectures and any(NAMES.fullmatch(n) for n in files.names)


def _overhead(tokenizer, prompt: str) -> int:
    return 2 * (len(tokenizer.encode(SEP, add_special_tokens=False))
                + len(tokenizer.encode(prompt, add_special_tokens=False)))


class BgeGemmaEncoder(PiecesEncoder):
    default_instruction = DEFAULT_PROMPT

    def __init__(self, *, positions: int | None, **kw):
        super().__init__(**kw)
        tok = self.tokenizer
        self.sep_ids = self._piece(SEP)
        self._prompts = {DEFAULT_PROMPT: self._piece(DEFAULT_PROMPT)}
        self.passage_length = self.max_length - 2 * (len(self.sep_ids) + len(self._prompts[DEFAULT_PROMPT]))
        if self.passage_length < 4:
            raise ModelLoadError(self.model_id, f"max_length {self.max_length} leaves no room for a query and a "
                                                "passage next to the prompt")
        # FlagEmbedding prepends BOS by hand when the tokenizer has one distinct from padding.
        bos, pad = tok.bos_token_id, tok.pad_token_id
        self.bos = [bos] if bos is not None and bos != pad else []
        self.positions = positions

    def _prompt_ids(self, instruction: str | None) -> list[int]:
        prompt = DEFAULT_PROMPT if instruction is None else instruction
        ids = self._prompts.get(prompt)
        if ids is None:
            # The default plus the latest custom prompt. Encoders run on several ingress threads at once, so the
            # ids are returned from here, never read back from a dict another thread may have replaced.
            ids = self._piece(prompt)
            self._prompts = {DEFAULT_PROMPT: self._prompts[DEFAULT_PROMPT], prompt: ids}
        return ids

    def query_text(self, query, instruction):
        return QUERY_FORMAT.format(query)

    def doc_text(self, doc):
        return PASSAGE_FORMAT.format(doc)

    def _assemble(self, q_enc, d_enc, truncate, direction, instruction):
        prompt_ids = self._prompt_ids(instruction)
        length = self.passage_length
        budget = length + len(self.sep_ids) + len(prompt_ids)  # FlagEmbedding's encode_max_length
        tail = self.sep_ids + prompt_ids
        ids, cuts = [], []
        for i, (q, d) in enumerate(zip(q_enc, d_enc)):
            first = self.bos + keep(q.ids, length * 3 // 4, direction)
            d_ids = keep(d.ids, length, direction)
            second = cut_second(len(first), self.sep_ids + d_ids, budget, direction)
            row = first + second + tail
            cut = len(first) - len(self.bos) < len(q.ids) or len(d_ids) < len(d.ids) \
                or len(second) < len(self.sep_ids) + len(d_ids)
            if cut and not truncate:
                raise InputTooLongError(
                    f"input {i} is longer than the model takes (passage {length} tokens, query {length * 3 // 4}); "
                    "shorten it or send truncate=true", index=i)
            if self.positions is not None and len(row) > self.positions:
                raise InputTooLongError(f"input {i} has {len(row)} tokens with its instruction, more than the "
                                        f"model's {self.positions} positions; shorten the instruction", index=i)
            ids.append(row)
            cuts.append(cut)
        return EncodedBatch.from_lists(ids), cuts

    def document_slot(self, query, query_tokens, instruction=None):
        """[bos] + tokens of "A: {q}" (q decoded back from its kept tokens) + "\\n" + tokens of "B: " | window |
        "\\n" + prompt: FlagEmbedding's separately tokenized pieces (docs/API.md)."""
        check_items(self, (), instruction)
        q_ids = self._piece(QUERY_FORMAT.format(self.kept_query(query, query_tokens)))
        return DocumentSlot(self.bos + q_ids + self.sep_ids + self._piece(PASSAGE_FORMAT.format("")),
                            self.sep_ids + self._prompt_ids(instruction))


def _encoder(model_id: str, model_dir: Path, config, max_length: int | None) -> BgeGemmaEncoder:
    """Max input length (docs/API.md): the configured one, else the smaller of the tokenizer's real limit and the
    position limit; with no real tokenizer limit, FlagEmbedding's default passage length plus the prompt overhead
    (capped by the position limit). The encoder's passage length L is that minus the overhead."""
    tok = load_tokenizer(model_id, model_dir, config)
    tokenizer_max = real_tokenizer_limit(getattr(tok, "model_max_length", None))
    default = None if tokenizer_max else DEFAULT_PASSAGE_LENGTH + _overhead(tok, DEFAULT_PROMPT)
    limit = resolve_max_length(model_id, configured=max_length, file_configured=None, tokenizer_max=tokenizer_max,
                               pos_limit=position_limit(config), default=default)
    return BgeGemmaEncoder(family=NAME, model_id=model_id, tokenizer=tok, max_length=limit, id2label={0: "LABEL_0"},
                           positions=position_limit(config))


def load_encoder(model_id: str, model_dir: Path, *, max_length: int | None = None) -> BgeGemmaEncoder:
    return _encoder(model_id, model_dir, load_config(model_id, model_dir), max_length)


class BgeGemmaScorer(CausalLMScorer):
    def __init__(self, model_id: str, model_dir: Path, *, max_length: int | None, **kw):
        config = load_config(model_id, model_dir)
        encoder = _encoder(model_id, model_dir, config, max_length)
        yes = encoder.tokenizer.encode("Yes", add_special_tokens=False)
        if not yes:
            raise ModelLoadError(model_id, "the tokenizer encodes 'Yes' to nothing")
        # FlagEmbedding's yes_loc: the first token of "Yes".
        super().__init__(NAME, model_id, model_dir, config, encoder, [yes[0]], **kw)

    def combine(self, logits):
        return logits[:, 0]


FAMILY = Family(name=NAME, detect=_detect, load_encoder=load_encoder, scorer=BgeGemmaScorer,
                supports="bge-reranker-v2-gemma (GemmaForCausalLM named bge-reranker-v2-gemma)")
