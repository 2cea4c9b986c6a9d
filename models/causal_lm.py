"""Pieces shared by the causal-LM rerankers (Qwen3-Reranker, Sentence Transformers causal CrossEncoders,
mxbai-rerank-v2, bge-reranker-v2-gemma): their score is read from the next-token logits at the last token.

Only the vocabulary rows the score needs are ever multiplied (h · W[token] for a handful of tokens), never the
whole output projection; W is lm_head.weight, or the input embedding when the model ties them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from tokenizers import Encoding

from .encoded import EncodedBatch
from .encoding import Encoder, backend_copy
from .errors import ModelLoadError
from .scoring import Scorer


def read_weight_rows(model_id: str, model_dir: Path, name: str, rows: list[int]) -> torch.Tensor:
    """Rows of one checkpoint tensor, read without loading the tensor (safetensors slices; *.bin via mmap)."""
    from .loading import bin_state_dicts, safetensors_holding

    files = safetensors_holding(model_dir, lambda n: n == name)
    if files == []:
        raise ModelLoadError(model_id, f"tensor {name} missing from the checkpoint",
                             file="model.safetensors.index.json")
    if files and files[0].is_file():
        from safetensors import safe_open

        with safe_open(str(files[0]), framework="pt") as f:
            if name not in f.keys():
                raise ModelLoadError(model_id, f"tensor {name} missing from the checkpoint", file=files[0].name)
            sl = f.get_slice(name)
            return torch.stack([sl[r:r + 1][0] for r in rows])
    for state in bin_state_dicts(model_dir):
        if name in state:
            return state[name][rows].clone()
    raise ModelLoadError(model_id, f"tensor {name} not found in any weights file", file=str(model_dir))


def is_tied(config) -> bool:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return bool(getattr(text, "tie_word_embeddings", getattr(config, "tie_word_embeddings", False)))


class TokenLogits:
    """The causal LM's logits of a few tokens from final hidden states: [N, H] -> [N, k] in fp32, with the
    model's final logit soft-capping (Gemma 2/3) applied as its lm_head forward does."""

    def __init__(self, model_id: str, model_dir: Path, config, model, token_ids: Sequence[int], device: str):
        ids = [int(t) for t in token_ids]
        vocab = model.get_input_embeddings().weight.shape[0]
        if any(not 0 <= t < vocab for t in ids):
            raise ModelLoadError(model_id, f"score token ids {ids} are outside the vocabulary of {vocab}")
        self.tied = is_tied(config)
        rows = (model.get_input_embeddings().weight[ids] if self.tied
                else read_weight_rows(model_id, model_dir, "lm_head.weight", ids))
        self.weight = rows.detach().float().to(device)  # [k, H], fp32 like the fp32 up-cast of the logits
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        self.softcap = getattr(text, "final_logit_softcapping", None)
        # Extra lm_head parameters this model does not materialise (for num_parameters).
        self.untied_parameters = 0 if self.tied else int(text.vocab_size) * int(text.hidden_size)

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = hidden.float() @ self.weight.T
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def last_hidden_padded(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[N, H]: the base model's hidden state at the last REAL token of each right-padded row."""
    hidden = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    last = attention_mask.sum(dim=1) - 1
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def last_hidden_packed(model, inputs) -> torch.Tensor:
    """[N, H]: the base model's hidden state at the last token of each packed sequence."""
    from .packing import last_token

    hidden = model(**inputs.model_kwargs(), use_cache=False).last_hidden_state
    return last_token(hidden, inputs.cu_seq_lens)


def pad_token_id(tokenizer, config=None) -> int:
    """Right padding's filler (never attended): the tokenizer's pad, else EOS, else the config's, else 0."""
    for pad in (tokenizer.pad_token_id, tokenizer.eos_token_id, getattr(config, "pad_token_id", None)):
        if isinstance(pad, int):
            return pad
    return 0


def keep(ids: list[int], n: int, direction: str) -> list[int]:
    """The first (right) or last (left) `n` of a piece's tokens, as the tokenizer's `truncation_side` cuts."""
    if len(ids) <= n:
        return ids
    return ids[:n] if direction == "right" else ids[len(ids) - n:]


def cut_second(first: int, second: list[int], budget: int, direction: str) -> list[int]:
    """The tokenizer's "only_second" cut of a pair: `second` shortened so first + second fits `budget`, when it
    can be (a pair it cannot fit that way is left whole, as the tokenizer leaves it)."""
    over = first + len(second) - budget
    if 0 < over < len(second):
        return second[:len(second) - over] if direction == "right" else second[over:]
    return second


class PiecesEncoder(Encoder):
    """Prompts assembled from separately tokenized pieces (mxbai, bge-gemma): each query and document is
    formatted, tokenized without special tokens, and the family's `_assemble` cuts the pieces to their own limits.
    A cut row can then be shorter than max_length, so `encode_with_cuts` reports which items were cut."""

    accepts_single = False
    accepts_instruction = True
    shares_prefix = True

    def __init__(self, **kw):
        super().__init__(**kw)
        self._full = backend_copy(self.tokenizer.backend_tokenizer, None)

    def _piece(self, text: str) -> list[int]:
        return self._full.encode(text, add_special_tokens=False).ids

    def query_text(self, query: str, instruction: str | None) -> str:
        raise NotImplementedError

    def doc_text(self, doc: str) -> str:
        raise NotImplementedError

    def _assemble(self, queries: list[Encoding], docs: list[Encoding], truncate: bool, direction: str,
                  instruction: str | None) -> tuple[EncodedBatch, list[bool]]:
        raise NotImplementedError

    def encode(self, items, *, truncate=True, direction="right", instruction=None, max_tokens_per_doc=None):
        return self._encode(items, truncate, direction, instruction, max_tokens_per_doc)[0]

    def encode_with_cuts(self, items, *, direction="right", instruction=None, max_tokens_per_doc=None):
        return self._encode(items, True, direction, instruction, max_tokens_per_doc)

    def _encode(self, items, truncate, direction, instruction, max_tokens_per_doc):
        direction, queries, docs = self.prompt_pairs(items, direction, instruction, max_tokens_per_doc)
        queries = [self.query_text(q, instruction) for q in queries]
        q_enc = self._full.encode_batch(queries, add_special_tokens=False)
        d_enc = self._full.encode_batch([self.doc_text(d) for d in docs], add_special_tokens=False)
        return self._assemble(q_enc, d_enc, truncate, direction, instruction)


class CausalLMScorer(Scorer):
    """The causal-LM reranker scorers: the headless base model (the vocabulary projection is never materialised),
    the logits of the score tokens at the last token, packed where the base model runs packed. A family passes
    its encoder and score tokens and implements `combine(logits [N, k]) -> raw scores [N]`."""

    def __init__(self, family: str, model_id: str, weights_dir: Path, config, encoder, token_ids: Sequence[int], *,
                 dtype: str, device: str, token_budget: int | None, execution: str = "auto"):
        from transformers import AutoModel

        from .loading import from_pretrained, torch_dtype
        from .packing import packed_position_offset

        super().__init__(family=family, model_id=model_id, encoder=encoder, dtype=dtype, device=device,
                         token_budget=token_budget, pad_id=pad_token_id(encoder.tokenizer, config), execution=execution)
        model = from_pretrained(model_id, AutoModel, weights_dir, quiet_unexpected=True, config=config,
                                dtype=torch_dtype(self.dtype))
        self.model = model.to(self.device).eval()
        self.logits = TokenLogits(model_id, weights_dir, config, self.model, token_ids, self.device)
        self.num_parameters = sum(p.numel() for p in self.model.parameters()) + self.logits.untied_parameters
        offset = packed_position_offset(config)
        self._packable = offset is not None
        self.position_offset = offset or 0
        self.set_execution()

    @property
    def supports_packed(self) -> bool:
        return self._packable  # base models verified to run packed (models/packing.py)

    def set_execution(self, requested: str | None = None) -> str:
        """As Scorer's; and a base model that runs packed keeps the "packed" attention implementation in padded
        execution too (it passes padded batches to SDPA unchanged), so that shared prefixes run packed on CPU."""
        execution = super().set_execution(requested)
        if self._packable and not self.device.startswith("cuda"):
            from . import attention

            if self.model.config._attn_implementation != attention.PACKED:
                self.model.set_attn_implementation(attention.register())
        return execution

    @property
    def shared_packed(self) -> bool:
        """Shared-prefix chunks run packed on CPU too, where the base model can: own parts then carry no padding
        (their lengths spread more than whole pairs') and prefix keys are not copied per padded row (measured:
        benchmarks/README.md). Padded CUDA execution (fp32) stays padded: one attention call per sequence there
        would leave the device idle."""
        return self.execution == "packed" or (self._packable and not self.device.startswith("cuda"))

    @property
    def supports_shared_prefix(self) -> bool:
        return self.shared_prefix_unsupported is None

    @property
    def shared_prefix_unsupported(self) -> str | None:
        """Why this model cannot compute shared prefixes once (models/prefix.py), None when it can; it depends on
        the attention implementation, which follows the execution mode."""
        from .prefix import unsupported_reason

        implementation = self.model.config._attn_implementation
        if getattr(self, "_prefix_checked", None) != implementation:
            self._prefix_reason, self._prefix_checked = unsupported_reason(self.model), implementation
        return self._prefix_reason

    def _attention_modules(self):
        return [self.model]

    def combine(self, logits: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _forward_packed(self, inputs):
        return self.combine(self.logits(last_hidden_packed(self.model, inputs)))

    def _forward_shared(self, inputs):
        from .prefix import shared_last_hidden

        return self.combine(self.logits(shared_last_hidden(self.model, inputs)))

    def _forward_padded(self, input_ids, attention_mask, token_type_ids):
        return self.combine(self.logits(last_hidden_padded(self.model, input_ids, attention_mask)))
