"""jina-reranker-v3 (`JinaForRanking`): listwise reranking, the documents of a request scored together.

The checkpoint is a Qwen3 causal LM whose output head is unused (its `lm_head` is the identity; the weights are
`model.*`) plus a projector MLP `projector.0` (hidden -> hidden/2, no bias), ReLU, `projector.2` (-> 512, no
bias). The tokenizer carries two marker tokens: `<|embed_token|>` closes each document, `<|rerank_token|>` the
query. Scores follow the model's own `JinaForRanking.rerank()` (docs/API.md, Scores), no remote code run:

1. the query is cut to 512 tokens and each document to 2048 (`max_tokens_per_doc` lowers that), by tokens, and a
   text that reaches the cut is DECODED back from its kept tokens (a cut inside a multi-byte character becomes
   U+FFFD), as the reference does;
2. the documents are split into blocks in their order: a block closes at 125 documents or once the capacity
   `max_length - 2 x query tokens`, less each document's tokens, falls to the document cut (2048) or below;
3. each block is one prompt (system text, a task line with the block's document count and the query, an optional
   `<instruct>`, passages numbered from 0, the query again, the no-thinking suffix) with the marker strings removed
   from the user's text first;
4. the last hidden state (after the final norm) at every marker goes through the projector; per block, the
   weight `max((1 + cos(query, doc)) / 2)` over its documents; the list's query vector is the weighted mean of its
   blocks' query vectors, and a document's score is its cosine with that vector, in [-1, 1].

`max_length` (default: the tokenizer's `model_max_length`, 131072 for the real model) is the capacity the
blocks are cut by; a block's prompt adds its template to that.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..config import load_config, position_limit, resolve_max_length
from ..encoded import EncodedBatch
from ..encoding import Encoder, backend_copy, check_items, check_max_tokens_per_doc, parse_direction
from ..errors import InputError, InputTooLongError, ModelLoadError
from ..scoring import Scorer
from ..tokenization import load_tokenizer
from . import Family

FAMILY_NAME = "jina_v3"

# The prompt of the reference's `format_docs_prompts_func` (no_thinking=True).
SYSTEM = ("<|im_start|>system\nYou are a search relevance expert who can determine a ranking of the passages based "
          "on how relevant they are to the query. If the query is a question, how relevant a passage is depends on "
          "how well it answers the question. If not, try to analyze the intent of the query and assess how well each "
          "passage satisfies the intent. If an instruction is provided, you should follow the instruction when "
          "determining the ranking.<|im_end|>\n<|im_start|>user\n")
SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
DOC_MARKER = "<|embed_token|>"
QUERY_MARKER = "<|rerank_token|>"
MAX_QUERY_TOKENS = 512
MAX_DOC_TOKENS = 2048
BLOCK_SIZE = 125
PROJECTOR = ("projector.0.weight", "projector.2.weight")


def without_markers(text: str) -> str:
    """`text` with the marker strings removed: the reference's pass (query marker, then document marker), repeated
    until none is left. One pass is all the reference makes; a second finds something only in text that the first
    pass turns into a marker (`<|rerank_<|embed_token|>token|>`), which would break the reference's prompt."""
    while True:
        out = text.replace(QUERY_MARKER, "").replace(DOC_MARKER, "")
        if out == text:
            return out
        text = out


def block_prompt(query: str, docs: Sequence[str], instruction: str | None = None) -> str:
    """One block's prompt, over texts already free of markers (`without_markers`)."""
    task = (f"I will provide you with {len(docs)} passages, each indicated by a numerical identifier. "
            f"Rank the passages based on their relevance to query: {query}\n")
    if instruction:  # as the reference: an empty instruction adds nothing
        task += f"<instruct>\n{instruction}\n</instruct>\n"
    passages = "\n".join(f'<passage id="{i}">\n{doc}{DOC_MARKER}\n</passage>' for i, doc in enumerate(docs))
    return f"{SYSTEM}{task}{passages}\n<query>\n{query}{QUERY_MARKER}\n</query>{SUFFIX}"


def plan_blocks(doc_lengths: Sequence[int], query_length: int, max_length: int, doc_limit: int,
                block_size: int = BLOCK_SIZE) -> list[list[int]]:
    """The documents (indices, in order) of each block: a block closes at `block_size` documents or once the
    capacity `max_length - 2 * query_length`, less its documents' tokens, is `doc_limit` or below."""
    blocks: list[list[int]] = []
    block: list[int] = []
    full = max_length - 2 * query_length
    capacity = full
    for i, length in enumerate(doc_lengths):
        block.append(i)
        capacity -= int(length)
        if len(block) >= block_size or capacity <= doc_limit:
            blocks.append(block)
            block, capacity = [], full
    if block:
        blocks.append(block)
    return blocks


@dataclass
class _Cut:
    text: str  # as the prompt takes it (decoded back when cut), markers still in
    tokens: int  # its token count, at most the limit: what the block capacity counts


class JinaEncoder(Encoder):
    """Items -> block prompts. A rank request's documents are ONE list (`one_list=True`, what the service passes for
    /rerank, /v1/rerank and /v2/rerank); otherwise every pair is a list of its own (/predict, /tokenize). The batch
    carries `groups` (the list of each block) and `outputs` (each block's documents); its scores come back in item
    order."""

    accepts_single = False
    accepts_instruction = True
    listwise = True
    sigmoid_scores = False  # cosines in [-1, 1], final as they are

    def __init__(self, **kw):
        super().__init__(**kw)
        self._full = backend_copy(self.tokenizer.backend_tokenizer, None)
        self.doc_marker_id = self._marker_id(DOC_MARKER)
        self.query_marker_id = self._marker_id(QUERY_MARKER)
        probe = "a b"
        if self._full.encode(probe, add_special_tokens=True).ids != self._full.encode(probe,
                                                                                      add_special_tokens=False).ids:
            # The cuts below count a text's own tokens; the reference's count includes what the tokenizer adds.
            raise ModelLoadError(self.model_id, "the tokenizer adds special tokens to a text; jina-reranker-v3's "
                                                "(Qwen's) adds none")

    def _marker_id(self, marker: str) -> int:
        ids = self._full.encode(marker, add_special_tokens=False).ids
        if len(ids) != 1:
            raise ModelLoadError(self.model_id, f"the tokenizer has no single {marker} token; not a jina-reranker-v3 "
                                                "tokenizer")
        return int(ids[0])

    def encode(self, items, *, truncate=True, direction="right", instruction=None, max_tokens_per_doc=None,
               one_list: bool = False) -> EncodedBatch:
        direction = parse_direction(direction)
        max_tokens_per_doc = check_max_tokens_per_doc(max_tokens_per_doc)
        check_items(self, items, instruction)
        items = list(items)
        if not items:
            return EncodedBatch.from_lists([], groups=[], outputs=[])
        if one_list and any(q != items[0][0] for q, _ in items):
            raise InputError("one list of documents needs one query")
        doc_limit = MAX_DOC_TOKENS if max_tokens_per_doc is None else min(MAX_DOC_TOKENS, max_tokens_per_doc)
        # truncate: false refuses a text the recipe would cut; a document `max_tokens_per_doc` cuts is cut as asked.
        refuse_docs = not truncate and (max_tokens_per_doc is None or max_tokens_per_doc > MAX_DOC_TOKENS)
        docs = self._cut([d for _, d in items], doc_limit, direction, "document",
                         refuse_over=MAX_DOC_TOKENS if refuse_docs else None)
        lists = [list(range(len(items)))] if one_list else [[i] for i in range(len(items))]
        first_item: dict[str, int] = {}  # each distinct query, cut once: {query: the first item that has it}
        for members in lists:
            first_item.setdefault(items[members[0]][0], members[0])
        distinct = list(first_item)
        cut_queries = dict(zip(distinct, self._cut(distinct, MAX_QUERY_TOKENS, direction, "query",
                                                   refuse_over=None if truncate else MAX_QUERY_TOKENS,
                                                   index_of=list(first_item.values()))))
        extra = without_markers(instruction) if instruction else None
        prompts, groups, outputs = [], [], []
        for group, members in enumerate(lists):
            query = cut_queries[items[members[0]][0]]
            clean_query = without_markers(query.text)
            for block in plan_blocks([docs[i].tokens for i in members], query.tokens, self.max_length, doc_limit):
                prompts.append(block_prompt(clean_query, [without_markers(docs[members[k]].text) for k in block],
                                            extra))
                groups.append(group)
                outputs.append(len(block))
        try:
            encodings = self._full.encode_batch(prompts, add_special_tokens=True)  # as the reference: no cut
        except Exception as e:  # noqa: BLE001 - a tokenizer failure on user text is the request's
            raise InputError(f"cannot tokenize the input: {e}") from e
        ids = [e.ids for e in encodings]
        for k, (seq, n_docs) in enumerate(zip(ids, outputs)):
            self._check_markers(seq, n_docs, k)
        return EncodedBatch.from_lists(ids, groups=groups, outputs=outputs)

    def _cut(self, texts: list[str], limit: int, direction: str, what: str, *, refuse_over: int | None,
             index_of: Sequence[int] | None = None) -> list[_Cut]:
        """Each text cut to `limit` tokens, decoded back when it reaches the limit (the reference's `>=`); a text
        over `refuse_over` tokens is a 422 (truncate: false)."""
        out = []
        try:
            encodings = self._full.encode_batch(texts, add_special_tokens=False)
        except Exception as e:  # noqa: BLE001 - a tokenizer failure on user text is the request's
            raise InputError(f"cannot tokenize the {what}: {e}") from e
        for k, (text, enc) in enumerate(zip(texts, encodings)):
            ids = enc.ids
            if refuse_over is not None and len(ids) > refuse_over:
                index = k if index_of is None else index_of[k]
                raise InputTooLongError(
                    f"the {what} has {len(ids)} tokens, more than the {refuse_over} jina-reranker-v3 reads of a "
                    f"{what}; shorten it or send truncate=true", index=index)
            if len(ids) >= limit:
                kept = ids[:limit] if direction == "right" else ids[len(ids) - limit:]
                text = self.tokenizer.decode(kept)  # the reference's decode: its defaults, special tokens kept
                ids = kept
            out.append(_Cut(text, len(ids)))
        return out

    def _check_markers(self, ids: list[int], n_docs: int, k: int) -> None:
        """One marker after each document and one after the query, last: what the scorer reads the states at."""
        seq = np.asarray(ids)
        docs = np.flatnonzero(seq == self.doc_marker_id)
        query = np.flatnonzero(seq == self.query_marker_id)
        if len(docs) != n_docs or len(query) != 1 or (n_docs and query[0] < docs[-1]):
            raise InputError(f"block {k}: the prompt has {len(docs)} document markers for {n_docs} documents and "
                             f"{len(query)} query markers; the text could not be templated")


def _encoder(model_id: str, model_dir: Path, config, max_length: int | None) -> JinaEncoder:
    tok = load_tokenizer(model_id, model_dir, config)
    limit = resolve_max_length(model_id, configured=max_length, file_configured=None,
                               tokenizer_max=getattr(tok, "model_max_length", None), pos_limit=position_limit(config))
    return JinaEncoder(family=FAMILY_NAME, model_id=model_id, tokenizer=tok, max_length=limit,
                       id2label={0: "LABEL_0"})


def load_encoder(model_id: str, model_dir: Path, *, max_length: int | None = None) -> JinaEncoder:
    return _encoder(model_id, model_dir, _qwen3_config(model_id, model_dir), max_length)


def _qwen3_config(model_id: str, model_dir: Path):
    config = load_config(model_id, model_dir)
    if config.model_type != "qwen3":
        raise ModelLoadError(model_id, f"JinaForRanking on a {config.model_type!r} backbone; only Qwen3 is known",
                             file="config.json")
    return config


def read_tensors(model_id: str, model_dir: Path, prefix: str) -> dict:
    """Every checkpoint tensor whose name starts with `prefix` (safetensors, sharded or not; else *.bin)."""
    from ..loading import bin_state_dicts, safetensors_holding

    files = safetensors_holding(model_dir, lambda n: n.startswith(prefix))
    out = {}
    if files:
        from safetensors import safe_open

        for file in files:
            with safe_open(str(file), framework="pt") as f:
                out.update({n: f.get_tensor(n) for n in f.keys() if n.startswith(prefix)})
        return out
    for state in bin_state_dicts(model_dir):
        out.update({n: t.clone() for n, t in state.items() if n.startswith(prefix)})
    return out


class JinaScorer(Scorer):
    """The Qwen3 base model (packed on CUDA in half precision, padded elsewhere, like the causal families), the
    projector in fp32 at the marker states, and the per-list merge. Scores come back in the batch's score order:
    each block's documents in block order, blocks in sequence order (`EncodedBatch.score_index`)."""

    def __init__(self, model_id: str, model_dir: Path, *, dtype: str, device: str, max_length: int | None,
                 token_budget: int | None, execution: str = "auto"):
        from transformers import AutoModel

        from ..causal_lm import pad_token_id
        from ..loading import from_pretrained, torch_dtype
        from ..packing import packed_position_offset

        config = _qwen3_config(model_id, model_dir)
        encoder = _encoder(model_id, model_dir, config, max_length)
        super().__init__(family=FAMILY_NAME, model_id=model_id, encoder=encoder, dtype=dtype, device=device,
                         token_budget=token_budget, pad_id=pad_token_id(encoder.tokenizer, config),
                         execution=execution)
        # The checkpoint's `model.*` into a headless Qwen3Model (the identity lm_head has no weights); never the
        # checkpoint's own code.
        model = from_pretrained(model_id, AutoModel, model_dir, quiet_unexpected=True, config=config,
                                dtype=torch_dtype(dtype), trust_remote_code=False)
        self.model = model.to(device).eval()
        self.w1, self.w2 = self._projector(model_id, model_dir, config.hidden_size)
        self.num_parameters = (sum(p.numel() for p in self.model.parameters()) + self.w1.numel() + self.w2.numel())
        offset = packed_position_offset(config)
        self._packable = offset is not None
        self.position_offset = offset or 0
        self.set_execution()
        if token_budget is None and self.execution == "packed":
            # A packed forward holds any block of the model's capacity (it is not padded to the longest): the
            # default budget takes one whole, so the longest blocks batch with others instead of running alone.
            self.token_budget = max(self.token_budget, self.max_block_tokens())

    def _projector(self, model_id: str, model_dir: Path, hidden: int):
        tensors = read_tensors(model_id, model_dir, "projector.")
        if set(tensors) != set(PROJECTOR):
            raise ModelLoadError(model_id, f"expected the projector weights {list(PROJECTOR)} (no biases), found "
                                           f"{sorted(tensors) or 'none'}", file=str(model_dir))
        w1, w2 = (tensors[n].float() for n in PROJECTOR)
        if w1.dim() != 2 or w2.dim() != 2 or w1.shape[1] != hidden or w2.shape[1] != w1.shape[0]:
            raise ModelLoadError(model_id, f"projector shapes {tuple(w1.shape)}, {tuple(w2.shape)} do not chain from "
                                           f"the hidden size {hidden}", file=str(model_dir))
        # fp32 like the other families' heads: a few rows per block, so precision costs nothing.
        return w1.to(self.device), w2.to(self.device)

    def max_block_tokens(self) -> int:
        """About the longest block prompt: the capacity plus the template of a full block of empty texts."""
        overhead = len(self.encoder._full.encode(block_prompt("", [""] * BLOCK_SIZE), add_special_tokens=True).ids)
        return int(self.max_length + overhead)

    @property
    def supports_packed(self) -> bool:
        return self._packable

    def _attention_modules(self):
        return [self.model]

    def score(self, batch: EncodedBatch) -> np.ndarray:
        import torch

        if batch.groups is None:
            raise ValueError("jina-reranker-v3 scores listwise batches (JinaEncoder.encode), not pairs")
        n = len(batch)
        if n == 0:
            return np.empty(0, dtype=np.float32)
        if batch.lengths.min() < 1:
            raise ValueError("cannot score an empty sequence (no tokens)")
        with torch.inference_mode():
            queries = torch.empty(n, self.w2.shape[0], device=self.device)
            docs = torch.empty(batch.num_scores, self.w2.shape[0], device=self.device)
            # Forward chunks of whole blocks (a block is one sequence); the merge waits for all of them.
            for index in self.chunks(batch.lengths):
                q_states, d_states = self._marker_states(batch, index)
                queries[torch.as_tensor(index, device=self.device)] = self._project(q_states)
                docs[torch.as_tensor(batch.score_index(index), device=self.device)] = self._project(d_states)
            scores = merge_lists(queries, docs, batch.groups, batch.outputs)
        return scores.float().cpu().numpy()

    def _project(self, states):
        import torch

        return torch.relu(states.float() @ self.w1.T) @ self.w2.T

    def _marker_states(self, batch: EncodedBatch, index: np.ndarray):
        """(query marker states [len(index), H], document marker states [their documents, H]) of one chunk, in
        the chunk's order. Marker positions come from the host ids (no device sync)."""
        import torch

        chunk = batch.select(index)
        if self.execution == "packed":
            from ..packing import pack

            flat = chunk.input_ids  # select() starts the chunk at offset 0: the packed row's positions
            q_pos = np.flatnonzero(flat == self.encoder.query_marker_id)
            d_pos = np.flatnonzero(flat == self.encoder.doc_marker_id)
            _check_counts(np.searchsorted(chunk.offsets, q_pos, side="right") - 1,
                          np.searchsorted(chunk.offsets, d_pos, side="right") - 1, chunk)
            inputs = pack(chunk, position_offset=self.position_offset).to(self.device)
            hidden = self.model(**inputs.model_kwargs(), use_cache=False).last_hidden_state[0]
            return (hidden.index_select(0, torch.as_tensor(q_pos, device=self.device)),
                    hidden.index_select(0, torch.as_tensor(d_pos, device=self.device)))
        from ..scoring import pad_right

        ids, mask, _ = pad_right(chunk, np.arange(len(chunk)), self.pad_id, False)
        q_rows, q_cols = np.nonzero((ids == self.encoder.query_marker_id) & (mask == 1))
        d_rows, d_cols = np.nonzero((ids == self.encoder.doc_marker_id) & (mask == 1))
        _check_counts(q_rows, d_rows, chunk)
        hidden = self.model(input_ids=torch.from_numpy(ids).to(self.device),
                            attention_mask=torch.from_numpy(mask).to(self.device), use_cache=False).last_hidden_state

        def at(rows, cols):
            return hidden[torch.as_tensor(rows, device=self.device), torch.as_tensor(cols, device=self.device)]

        return at(q_rows, q_cols), at(d_rows, d_cols)



def _check_counts(q_seq: np.ndarray, d_seq: np.ndarray, chunk: EncodedBatch) -> None:
    """One query marker per block, one document marker per document (the encoder checks this too: a batch made
    elsewhere could not be scored right)."""
    n = len(chunk)
    if not (np.array_equal(np.bincount(q_seq, minlength=n), np.ones(n, np.int64))
            and np.array_equal(np.bincount(d_seq, minlength=n), chunk.outputs)):
        raise ValueError("a block's markers do not match its documents")


def merge_lists(queries, docs, groups: np.ndarray, outputs: np.ndarray):
    """The final cosines [M] from block query vectors [N, P] and document vectors [M, P] (sequence order, outputs[i]
    documents of block i): per block the weight max((1 + cos) / 2) over its documents, per list (group) the
    weighted mean of its blocks' query vectors, and each document's cosine with its list's vector."""
    import torch
    import torch.nn.functional as F

    device = queries.device
    n = queries.shape[0]
    block_of_doc = torch.repeat_interleave(torch.arange(n, device=device),
                                           torch.as_tensor(outputs, dtype=torch.long, device=device))
    cos = F.cosine_similarity(docs, queries[block_of_doc], dim=-1)
    weights = torch.zeros(n, device=device, dtype=cos.dtype).scatter_reduce_(
        0, block_of_doc, (1.0 + cos) / 2.0, reduce="amax", include_self=False)
    _, list_of_block = np.unique(np.asarray(groups), return_inverse=True)
    list_of_block = torch.as_tensor(list_of_block.reshape(-1), dtype=torch.long, device=device)
    count = int(list_of_block.max()) + 1
    merged = torch.zeros(count, queries.shape[1], device=device, dtype=queries.dtype).index_add_(
        0, list_of_block, weights[:, None] * queries)
    total = torch.zeros(count, device=device, dtype=weights.dtype).index_add_(0, list_of_block, weights)
    merged = merged / total[:, None]
    return F.cosine_similarity(docs, merged[list_of_block[block_of_doc]], dim=-1)


def _detect(files) -> bool:
    return "JinaForRanking" in files.architectures


FAMILY = Family(name=FAMILY_NAME, detect=_detect, load_encoder=load_encoder, scorer=JinaScorer,
                supports="JinaForRanking (jina-reranker-v3, listwise)", listwise=True)
