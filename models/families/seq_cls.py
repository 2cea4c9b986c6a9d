"""`*ForSequenceClassification` rerankers (BERT, XLM-R, ModernBERT, ...): raw score = logits[:, 0].

Packed execution (BERT, XLM-R, ModernBERT; any other architecture runs padded) calls the base model on the packed
row and re-creates the class's own head on the rows it reads — see `_packed_head`."""
from __future__ import annotations

from pathlib import Path

from ..config import load_config
from ..encoding import PairEncoder
from ..loading import from_pretrained, torch_dtype
from ..modernbert import cls_only_last_layer
from ..packing import packed_position_offset
from ..pooling import pool_packed
from ..scoring import Scorer
from ..tokenization import load_tokenizer, pad_id_of, pair_encoder
from . import Family


def load_encoder(model_id: str, model_dir: Path, *, max_length: int | None = None) -> PairEncoder:
    config = load_config(model_id, model_dir)
    return pair_encoder("seq_cls", model_id, load_tokenizer(model_id, model_dir, config), config, max_length=max_length)


def _packed_head(model):
    """(base model, head(packed hidden, cu_seq_lens) -> logits) mirroring `model.forward`, or None when the
    architecture has no verified packed form. Each head reads only the rows it needs."""
    from transformers import (BertForSequenceClassification, ModernBertForSequenceClassification,
                              XLMRobertaForSequenceClassification)

    if isinstance(model, ModernBertForSequenceClassification):
        pooling = model.config.classifier_pooling
        if pooling not in ("cls", "mean"):
            return None
        # cls: last_hidden_state[:, 0]; mean: the masked mean -> head -> drop -> classifier
        return model.model, lambda h, cu: model.classifier(model.drop(model.head(pool_packed(h, cu, (pooling,)))))
    if isinstance(model, BertForSequenceClassification) and model.bert.pooler is not None:
        # BertPooler reads hidden[:, 0] of [N, S, H]: hand it each pair's first row as a length-1 sequence
        return model.bert, lambda h, cu: model.classifier(model.dropout(
            model.bert.pooler(pool_packed(h, cu, ("cls",)).unsqueeze(1))))
    if isinstance(model, XLMRobertaForSequenceClassification):
        # XLMRobertaClassificationHead reads features[:, 0, :]
        return model.roberta, lambda h, cu: model.classifier(pool_packed(h, cu, ("cls",)).unsqueeze(1))
    return None


class SeqClsScorer(Scorer):
    def __init__(self, model_id: str, model_dir: Path, *, dtype: str, device: str, max_length: int | None,
                 token_budget: int | None, execution: str = "auto"):
        from transformers import AutoModelForSequenceClassification

        config = load_config(model_id, model_dir)
        encoder = pair_encoder("seq_cls", model_id, load_tokenizer(model_id, model_dir, config), config,
                               max_length=max_length)
        super().__init__(family="seq_cls", model_id=model_id, encoder=encoder, dtype=dtype, device=device,
                         token_budget=token_budget, pad_id=pad_id_of(config, encoder.tokenizer),
                         uses_token_types=encoder.uses_token_types, execution=execution)
        model = from_pretrained(model_id, AutoModelForSequenceClassification, model_dir, config=config,
                                dtype=torch_dtype(dtype))
        self.model = model.to(device).eval()
        self.num_parameters = sum(p.numel() for p in self.model.parameters())
        offset = packed_position_offset(config)
        self._packed = _packed_head(self.model) if offset is not None else None
        self.position_offset = offset or 0
        if getattr(self.model.config, "classifier_pooling", None) == "cls":  # ModernBERT reading [:, 0] only
            cls_only_last_layer(self.model.base_model)
        self.set_execution()

    @property
    def supports_packed(self) -> bool:
        return self._packed is not None

    def _attention_modules(self):
        return [self.model]

    def _forward_packed(self, inputs):
        base, head = self._packed
        hidden = base(**inputs.model_kwargs()).last_hidden_state
        return head(hidden, inputs.cu_seq_lens)[:, 0]

    def _forward_padded(self, input_ids, attention_mask, token_type_ids):
        extra = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **extra).logits[:, 0]


def _detect(files) -> bool:
    return any(a.endswith("ForSequenceClassification") for a in files.architectures)


FAMILY = Family(name="seq_cls", detect=_detect, load_encoder=load_encoder, scorer=SeqClsScorer,
                supports="*ForSequenceClassification")
