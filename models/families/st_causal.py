"""Sentence Transformers causal CrossEncoders (sentence-transformers >= 5.4): modules.json = Transformer
(`transformer_task: "text-generation"`) -> LogitScore. Qwen3-Reranker as sentence-transformers ships it, zerank-2,
ctxl-rerank-v2, ...

Input, as `CrossEncoder.predict` builds it: the pair becomes the messages [system: prompt]? + query + document
(roles "query" / "document"); the tokenizer's chat template renders them (template kwargs from
`processing_kwargs["chat_template"]`); the rendering is tokenized without special tokens and cut longest-first
(one sequence: its end, or its start under Left truncation) to the max length; then (`restore_suffix`, the default)
the template's tail is written back over the last tokens of every row that reached the max length.
raw = logit[true_token_id] - logit[false_token_id] at the last token (logit[true_token_id] without a false token).
A request's `instruction` replaces the prompt (an empty one drops the system message, as an empty prompt does).
"""
from __future__ import annotations

import logging
from pathlib import Path

from ..causal_lm import CausalLMScorer
from ..config import load_config, position_limit, read_json, resolve_max_length
from ..encoded import EncodedBatch
from ..encoding import DocumentSlot, Encoder, backend_copy, check_items
from ..errors import InputError, InputTooLongError, ModelLoadError
from ..tokenization import load_tokenizer
from . import Family

log = logging.getLogger(__name__)

NAME = "st_causal"
# sentence-transformers' own defaults and constants (base/modality.py, base/modules/transformer.py).
_SIZE_KWARGS = {"padding", "truncation", "max_length", "return_tensors"}  # never reach the template render
_STRUCTURED_PATTERNS = ("content[0]", ".type", "'type'", '"type"', "item.type", "message.content[")
_FLAT_MODEL_TYPES = {"apertus", "deepseek_v3", "gpt_oss", "seed_oss"}
_SUFFIX_FILLERS = ("0", "1 2 3 4")  # two renders whose common token tail is the template's own tail
MAX_CACHED_PROMPTS = 64  # template tails kept per encoder (one per distinct prompt / instruction)
# Stand-ins for a document, to find where the template puts it (private-use characters: in no template's text).
_DOC_MARKERS = ("\ue000document-a\ue001", "\ue000document-b\ue001")
_ROLE_PROBES = (("alpha", "bravo"), ("charlie", "bravo"), ("alpha", "foxtrot"))


def _module_kind(entry: dict) -> str:
    return str(entry.get("type", "")).rsplit(".", 1)[-1]


def _detect(files) -> bool:
    return "LogitScore" in files.module_types


class Spec:
    """What the files say, read without weights."""

    def __init__(self, model_id: str, model_dir: Path):
        modules = sorted(read_json(model_id, model_dir / "modules.json"), key=lambda m: int(m.get("idx", 0)))
        kinds = [_module_kind(m) for m in modules]
        if kinds != ["Transformer", "LogitScore"]:
            raise ModelLoadError(model_id, f"modules {kinds} are not supported; a causal CrossEncoder is exactly "
                                           "Transformer -> LogitScore", file="modules.json")
        self.backbone_dir = model_dir / modules[0].get("path", "")
        self.st_config = read_json(model_id, self.backbone_dir / "sentence_bert_config.json", required=False) or {}
        task = self.st_config.get("transformer_task")
        if task != "text-generation":
            raise ModelLoadError(model_id, f"the Transformer has transformer_task {task!r}; a LogitScore reads the "
                                           "logits of a 'text-generation' one", file="sentence_bert_config.json")
        score_file = model_dir / modules[1].get("path", "") / "config.json"
        score = read_json(model_id, score_file)
        self.true_id = score.get("true_token_id")
        self.false_id = score.get("false_token_id")
        if not isinstance(self.true_id, int) or not (self.false_id is None or isinstance(self.false_id, int)):
            raise ModelLoadError(model_id, "LogitScore needs an integer true_token_id (and an integer or null "
                                           "false_token_id)", file=str(score_file))
        ce = read_json(model_id, model_dir / "config_sentence_transformers.json", required=False) or {}
        name = ce.get("default_prompt_name")
        prompts = ce.get("prompts") or {}
        if name is not None and name not in prompts:
            raise ModelLoadError(model_id, f"default_prompt_name {name!r} is not among the prompts {list(prompts)}",
                                 file="config_sentence_transformers.json")
        self.default_prompt = prompts.get(name) if name is not None else None
        processing = self.st_config.get("processing_kwargs") or {}
        self.template_kwargs = dict(processing.get("chat_template") or {})
        self.restore_suffix = bool(self.template_kwargs.pop("restore_suffix", True))
        text_kwargs = {**(processing.get("common") or {}), **(processing.get("text") or {})}
        # Size kwargs may ride in any bucket; the chat-template one wins (as sentence-transformers reads them).
        sizes = {**{k: v for k, v in text_kwargs.items() if k in _SIZE_KWARGS},
                 **{k: self.template_kwargs.pop(k) for k in list(self.template_kwargs) if k in _SIZE_KWARGS}}
        if sizes.get("truncation") in (False, "do_not_truncate"):
            raise ModelLoadError(model_id, "processing_kwargs turn truncation off; not supported",
                                 file="sentence_bert_config.json")
        self.file_max_length = sizes.get("max_length") or self.st_config.get("max_seq_length")
        modality = self.st_config.get("modality_config") or {}
        if modality and "message" not in modality:
            raise ModelLoadError(model_id, "the Transformer takes no chat messages (no chat template); only "
                                           "chat-template causal CrossEncoders are supported",
                                 file="sentence_bert_config.json")
        self.message_format = (modality.get("message") or {}).get("format")


class StCausalEncoder(Encoder):
    accepts_single = False
    accepts_instruction = True
    shares_prefix = True

    def __init__(self, *, spec: Spec, model_type: str, **kw):
        super().__init__(**kw)
        tok = self.tokenizer
        self.template_kwargs = spec.template_kwargs
        self.restore_suffix = spec.restore_suffix
        self.default_instruction = spec.default_prompt
        try:
            template = tok.get_chat_template(self.template_kwargs.get("chat_template"))
        except Exception as e:
            raise ModelLoadError(self.model_id, f"no chat template: {e}") from e
        self.flat = self._is_flat(spec.message_format, model_type, template)
        backend = tok.backend_tokenizer
        self._full = backend_copy(backend, None)
        self._cut = {d: backend_copy(backend, self.max_length, d) for d in ("right", "left")}
        self._suffixes: dict[str | None, list[int]] = {}  # prompt -> template tail (suffix_ids)
        self._check_pair_roles()

    @staticmethod
    def _is_flat(saved: str | None, model_type: str, template: str) -> bool:
        """sentence-transformers' message format: saved in modality_config, else inferred from the template."""
        if saved in ("flat", "structured"):
            return saved == "flat"
        if model_type in _FLAT_MODEL_TYPES:
            return True
        return not any(p in template for p in _STRUCTURED_PATTERNS)

    def _message(self, role: str, text: str) -> dict:
        return {"role": role, "content": text if self.flat else [{"type": "text", "text": text}]}

    def _conversation(self, prompt: str | None, query: str, doc: str) -> list[dict]:
        system = [self._message("system", prompt)] if prompt else []  # an empty prompt adds nothing
        return system + [self._message("query", query), self._message("document", doc)]

    def _render(self, conversations: list[list[dict]]) -> list[str]:
        return self.tokenizer.apply_chat_template(conversations, tokenize=False, **self.template_kwargs)

    def _check_pair_roles(self) -> None:
        """As sentence-transformers refuses it: a template that renders neither role scores empty inputs."""
        try:
            renders = self._render([self._conversation(None, q, d) for q, d in _ROLE_PROBES])
        except Exception as e:
            raise ModelLoadError(self.model_id, f"the chat template fails on a (query, document) pair: {e}") from e
        if renders[0] == renders[1] or renders[0] == renders[2]:
            raise ModelLoadError(self.model_id, "the chat template does not render the 'query' and 'document' roles "
                                                "a pair is mapped to")

    def suffix_ids(self, prompt: str | None) -> list[int]:
        """The template's tail after the document, for one prompt: the common token tail of two renders with
        different filler contents (system message kept), [] when the renders never diverge."""
        suffix = self._suffixes.get(prompt)
        if suffix is None:
            try:  # the prompt may be the request's instruction: a template that raises on it is that input's fault
                renders = [self._render([self._conversation(prompt, f, f)])[0] for f in _SUFFIX_FILLERS]
            except Exception as e:
                raise InputError(f"the model's chat template cannot render the instruction: {e}",
                                 field="instruction") from e
            first, second = (self._full.encode(r, add_special_tokens=False).ids for r in renders)
            count = 0
            for a, b in zip(reversed(first), reversed(second)):
                if a != b:
                    break
                count += 1
            suffix = first[len(first) - count:] if 0 < count < min(len(first), len(second)) else []
            # Keyed by the request's instruction: bounded, so distinct instructions cannot grow the ingress without
            # end (a cleared cache only costs two renders); the value is returned, never read back.
            if len(self._suffixes) >= MAX_CACHED_PROMPTS:
                self._suffixes = {}
            self._suffixes[prompt] = suffix
        return suffix

    def encode(self, items, *, truncate=True, direction="right", instruction=None, max_tokens_per_doc=None):
        direction, queries, docs = self.prompt_pairs(items, direction, instruction, max_tokens_per_doc)
        prompt = self.default_instruction if instruction is None else instruction
        try:
            texts = self._render([self._conversation(prompt, q, d) for q, d in zip(queries, docs)])
        except Exception as e:  # a template that raises on this input (e.g. its own checks)
            raise InputError(f"the model's chat template cannot render the input: {e}") from e
        encodings = (self._cut[direction] if truncate else self._full).encode_batch(texts, add_special_tokens=False)
        suffix = self.suffix_ids(prompt) if truncate and self.restore_suffix else []
        ids = []
        for i, e in enumerate(encodings):
            row = e.ids
            if not row:
                raise InputError(f"item {i} has no tokens at all", index=i)
            if not truncate and len(row) > self.max_length:
                raise InputTooLongError(
                    f"input {i} has {len(row)} tokens after templating, more than the model's maximum of "
                    f"{self.max_length}; shorten it or send truncate=true", index=i)
            if suffix and len(row) >= self.max_length:  # cut (or exactly full): the tail goes back on
                keep = min(len(suffix), len(row))
                row = row[:len(row) - keep] + suffix[len(suffix) - keep:]
            ids.append(row)
        return EncodedBatch.from_lists(ids)

    def document_slot(self, query, query_tokens, instruction=None):
        """The chat template's rendering split at the document (docs/API.md): the text before it and the text after
        it, each tokenized as one piece, around the window; the query decoded back from its kept tokens. The two
        pieces are tokenized apart, as the window is, so no token spans a boundary (a rendering tokenized whole
        may merge the document's first or last characters with the template's)."""
        check_items(self, (), instruction)
        prompt = self.default_instruction if instruction is None else instruction
        query = self.kept_query(query, query_tokens)
        try:
            renders = self._render([self._conversation(prompt, query, m) for m in _DOC_MARKERS])
        except Exception as e:
            raise InputError(f"the model's chat template cannot render the input: {e}") from e
        parts = [r.split(m) for r, m in zip(renders, _DOC_MARKERS)]
        # The document must be placed verbatim, once, with the same text around it whatever it is.
        if any(len(x) != 2 for x in parts) or parts[0] != parts[1]:
            raise InputError(f"model {self.model_id!r}: cannot locate the document in its chat template's rendering; "
                             "send long_documents=\"truncate\"")
        before, after = self._full.encode_batch(parts[0], add_special_tokens=False)
        return DocumentSlot(before.ids, after.ids)


def _encoder(model_id: str, spec: Spec, config, max_length: int | None) -> StCausalEncoder:
    tok = load_tokenizer(model_id, spec.backbone_dir, config)
    limit = resolve_max_length(model_id, configured=max_length, file_configured=spec.file_max_length,
                               tokenizer_max=getattr(tok, "model_max_length", None), pos_limit=position_limit(config))
    return StCausalEncoder(family=NAME, model_id=model_id, tokenizer=tok, max_length=limit, id2label={0: "LABEL_0"},
                           spec=spec, model_type=config.model_type)


def load_encoder(model_id: str, model_dir: Path, *, max_length: int | None = None) -> StCausalEncoder:
    spec = Spec(model_id, model_dir)
    return _encoder(model_id, spec, load_config(model_id, spec.backbone_dir), max_length)


class StCausalScorer(CausalLMScorer):
    def __init__(self, model_id: str, model_dir: Path, *, max_length: int | None, **kw):
        spec = Spec(model_id, model_dir)
        config = load_config(model_id, spec.backbone_dir)
        encoder = _encoder(model_id, spec, config, max_length)
        ids = [spec.true_id] + ([spec.false_id] if spec.false_id is not None else [])
        super().__init__(NAME, model_id, spec.backbone_dir, config, encoder, ids, **kw)

    def combine(self, logits):
        return logits[:, 0] - logits[:, 1] if logits.shape[1] == 2 else logits[:, 0]


FAMILY = Family(name=NAME, detect=_detect, load_encoder=load_encoder, scorer=StCausalScorer,
                supports="Sentence Transformers causal CrossEncoders (modules.json: Transformer, LogitScore)")
