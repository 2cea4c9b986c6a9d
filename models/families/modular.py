"""Modular Sentence Transformers cross-encoders (the ettin family):
modules.json = Transformer -> Pooling -> any Dense / LayerNorm -> a last Dense(out_features=1, output "scores").

The backbone loads with transformers' AutoModel; pooling and head run in plain torch, mirroring
sentence-transformers' modules (which is a test dependency only, never imported here).
"""
from __future__ import annotations

import importlib
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..config import load_config, read_json
from ..encoding import PairEncoder
from ..errors import ModelLoadError
from ..loading import from_pretrained, torch_dtype
from ..modernbert import cls_only_last_layer
from ..packing import packed_position_offset
from ..pooling import LEGACY_POOLING_FLAGS, PACKED_POOLING_MODES, POOLING_MODES, pool, pool_packed
from ..scoring import Scorer
from ..tokenization import load_tokenizer, pad_id_of, pair_encoder
from . import Family

# Current (`sentence_transformers.base.modules.transformer.Transformer`, `...sentence_transformer.modules.
# pooling.Pooling`, ...) and legacy (`sentence_transformers.models.Dense`) module type strings.
_MODULE_TYPE = re.compile(r"^sentence_transformers\.(?:models|base\.modules|sentence_transformer\.modules|"
                          r"cross_encoder\.modules)(?:\.[a-z_]+)?\.(Transformer|Pooling|Dense|LayerNorm)$")

def module_kind(type_string: str) -> str | None:
    m = _MODULE_TYPE.match(str(type_string))
    return m.group(1) if m else None


@dataclass
class ModularSpec:
    """What modules.json and the module configs say, read without loading any weights."""
    backbone_dir: Path
    st_config: dict  # the Transformer module's sentence_bert_config.json
    pooling_modes: tuple[str, ...]
    head: list[tuple[str, Path, dict]] = field(default_factory=list)  # (Dense|LayerNorm, folder, config)


def _pooling_modes(model_id: str, cfg: dict, file: str) -> tuple[str, ...]:
    if "pooling_mode" in cfg:
        mode = cfg["pooling_mode"]
        modes = (mode,) if isinstance(mode, str) else tuple(mode)
    else:
        modes = tuple(m for flag, m in LEGACY_POOLING_FLAGS.items() if cfg.get(flag)) or ("mean",)
    for m in modes:
        if m not in POOLING_MODES:
            raise ModelLoadError(model_id, f"unsupported pooling mode {m!r} (known: {POOLING_MODES})", file=file)
    return modes


def parse_modules(model_id: str, model_dir: Path) -> ModularSpec:
    modules = read_json(model_id, model_dir / "modules.json")
    modules = sorted(modules, key=lambda m: int(m.get("idx", 0)))
    kinds = [module_kind(m.get("type", "")) for m in modules]

    def bad(i: int, why: str):
        m = modules[i]
        return ModelLoadError(model_id, f"module {m.get('name', i)!r} ({m.get('type')!r}, path {m.get('path')!r}) "
                                        f"{why}", file="modules.json")

    if kinds[0] != "Transformer":
        raise bad(0, "comes first; a modular cross-encoder must start with a Transformer")
    if len(modules) < 2 or kinds[1] != "Pooling":
        raise bad(min(1, len(modules) - 1), "follows the Transformer; a Pooling module is required there")
    backbone_dir = model_dir / modules[0].get("path", "")
    st_config = read_json(model_id, backbone_dir / "sentence_bert_config.json", required=False) or {}
    task = st_config.get("transformer_task", "feature-extraction")
    if task != "feature-extraction":
        raise bad(0, f"has transformer_task {task!r}; only 'feature-extraction' backbones feed a Pooling")
    pool_file = model_dir / modules[1]["path"] / "config.json"
    modes = _pooling_modes(model_id, read_json(model_id, pool_file), str(pool_file))
    head = []
    for i in range(2, len(modules)):
        if kinds[i] not in ("Dense", "LayerNorm"):
            raise bad(i, "is not supported after the Pooling (only Dense and LayerNorm are)")
        folder = model_dir / modules[i]["path"]
        head.append((kinds[i], folder, read_json(model_id, folder / "config.json")))
    if not head or head[-1][0] != "Dense" or head[-1][2].get("out_features") != 1 \
            or head[-1][2].get("module_output_name") != "scores":
        raise bad(len(modules) - 1, "is last; the last module must be a Dense with out_features == 1 and "
                                    "module_output_name == 'scores'")
    return ModularSpec(backbone_dir, st_config, modes, head)


def resolve_activation(model_id: str, path: str | None, file: str) -> nn.Module:
    """An activation named by a torch.nn class path (e.g. torch.nn.modules.activation.GELU). Only torch.nn is
    ever imported: a config must not be able to run other code."""
    if path is None:
        return nn.Identity()
    module_name, _, cls_name = str(path).rpartition(".")
    if not (module_name == "torch.nn" or module_name.startswith("torch.nn.")):
        raise ModelLoadError(model_id, f"activation {path!r} is not a torch.nn class", file=file)
    try:
        cls = getattr(importlib.import_module(module_name), cls_name)
    except (ImportError, AttributeError) as e:
        raise ModelLoadError(model_id, f"activation {path!r} not found in torch.nn", file=file) from e
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ModelLoadError(model_id, f"activation {path!r} is not a torch.nn.Module class", file=file)
    return cls()


def _module_weights(model_id: str, folder: Path) -> dict[str, torch.Tensor]:
    st, pt = folder / "model.safetensors", folder / "pytorch_model.bin"
    if st.is_file():
        from safetensors.torch import load_file
        return load_file(str(st))
    if pt.is_file():
        return torch.load(str(pt), map_location="cpu", weights_only=True)
    raise ModelLoadError(model_id, "module weights missing (model.safetensors or pytorch_model.bin)", file=str(folder))


class DenseStep(nn.Module):
    """sentence-transformers Dense: out = activation(linear(x)) (+ residual), read from / written to named features."""

    def __init__(self, model_id: str, folder: Path, cfg: dict):
        super().__init__()
        file = str(folder / "config.json")
        self.input_name = cfg.get("module_input_name", "sentence_embedding")
        self.output_name = cfg.get("module_output_name") or self.input_name
        # An absent activation is sentence-transformers' default, Tanh.
        self.activation = resolve_activation(model_id, cfg.get("activation_function", "torch.nn.Tanh"), file)
        self.linear = nn.Linear(cfg["in_features"], cfg["out_features"], bias=cfg.get("bias", True))
        self.use_residual = bool(cfg.get("use_residual", False))
        if self.use_residual and cfg["in_features"] != cfg["out_features"]:
            self.residual = nn.Linear(cfg["in_features"], cfg["out_features"], bias=False)
        _load_state(model_id, self, folder)

    def forward(self, features: dict[str, torch.Tensor]) -> None:
        x = features[self.input_name]
        out = self.activation(self.linear(x))
        if self.use_residual:
            out = out + (self.residual(x) if hasattr(self, "residual") else x)
        features[self.output_name] = out


class LayerNormStep(nn.Module):
    """sentence-transformers LayerNorm: nn.LayerNorm(dimension) (eps 1e-5, with bias) on the sentence embedding."""

    def __init__(self, model_id: str, folder: Path, cfg: dict):
        super().__init__()
        self.norm = nn.LayerNorm(cfg["dimension"])
        _load_state(model_id, self, folder)

    def forward(self, features: dict[str, torch.Tensor]) -> None:
        features["sentence_embedding"] = self.norm(features["sentence_embedding"])


def _load_state(model_id: str, module: nn.Module, folder: Path) -> None:
    state = _module_weights(model_id, folder)
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ModelLoadError(model_id, f"module weights do not match its config: {e}", file=str(folder)) from e


class ModularHead(nn.Module):
    def __init__(self, modes: tuple[str, ...], steps: list[nn.Module]):
        super().__init__()
        self.modes = modes
        self.steps = nn.ModuleList(steps)

    def forward(self, token_embeddings: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.score_pooled(pool(token_embeddings, attention_mask, self.modes))

    def forward_packed(self, hidden: torch.Tensor, cu_seq_lens: torch.Tensor) -> torch.Tensor:
        return self.score_pooled(pool_packed(hidden, cu_seq_lens, self.modes))

    def score_pooled(self, pooled: torch.Tensor) -> torch.Tensor:
        """The Dense / LayerNorm steps on the pooled [N, H'] vectors -> raw scores [N]."""
        features = {"sentence_embedding": pooled}
        for step in self.steps:
            step(features)
        return features["scores"][:, 0]


def _encoder(model_id: str, spec: ModularSpec, max_length: int | None) -> PairEncoder:
    from tokenizers import normalizers

    config = load_config(model_id, spec.backbone_dir)
    tok = load_tokenizer(model_id, spec.backbone_dir, config)
    if spec.st_config.get("do_lower_case"):
        # As sentence-transformers does: put a Lowercase in front of the normaliser unless one is there.
        backend = tok.backend_tokenizer
        current = backend.normalizer
        parts = list(current) if isinstance(current, normalizers.Sequence) else ([current] if current else [])
        if not any(isinstance(n, normalizers.Lowercase) for n in parts):
            backend.normalizer = normalizers.Sequence([normalizers.Lowercase(), *parts])
    return pair_encoder("modular", model_id, tok, config, max_length=max_length,
                        file_max_length=spec.st_config.get("max_seq_length"))


def _check_no_default_prompt(model_id: str, model_dir: Path) -> None:
    cfg = read_json(model_id, model_dir / "config_sentence_transformers.json", required=False) or {}
    if cfg.get("default_prompt_name"):
        raise ModelLoadError(model_id, f"default prompt {cfg['default_prompt_name']!r} is not supported",
                             file="config_sentence_transformers.json")


def load_encoder(model_id: str, model_dir: Path, *, max_length: int | None = None) -> PairEncoder:
    spec = parse_modules(model_id, model_dir)
    _check_no_default_prompt(model_id, model_dir)
    return _encoder(model_id, spec, max_length)


class ModularScorer(Scorer):
    def __init__(self, model_id: str, model_dir: Path, *, dtype: str, device: str, max_length: int | None,
                 token_budget: int | None, execution: str = "auto"):
        from transformers import AutoModel

        spec = parse_modules(model_id, model_dir)
        _check_no_default_prompt(model_id, model_dir)
        encoder = _encoder(model_id, spec, max_length)
        config = load_config(model_id, spec.backbone_dir)
        super().__init__(family="modular", model_id=model_id, encoder=encoder, dtype=dtype, device=device,
                         token_budget=token_budget, pad_id=pad_id_of(config, encoder.tokenizer),
                         uses_token_types=encoder.uses_token_types, execution=execution)
        steps = [(DenseStep if kind == "Dense" else LayerNormStep)(model_id, folder, cfg)
                 for kind, folder, cfg in spec.head]
        backbone = from_pretrained(model_id, AutoModel, spec.backbone_dir, config=config, dtype=torch_dtype(dtype))
        self.backbone = backbone.to(device).eval()
        # Like sentence-transformers: the head runs in the backbone's dtype.
        self.head = ModularHead(spec.pooling_modes, steps).to(device=device, dtype=torch_dtype(dtype)).eval()
        self.num_parameters = sum(p.numel() for m in (self.backbone, self.head) for p in m.parameters())
        offset = packed_position_offset(config)
        self._packable = offset is not None and all(m in PACKED_POOLING_MODES for m in spec.pooling_modes)
        self.position_offset = offset or 0
        if spec.pooling_modes == ("cls",):  # the head reads the CLS row alone
            cls_only_last_layer(self.backbone)
        self.set_execution()

    @property
    def supports_packed(self) -> bool:
        return self._packable

    def _attention_modules(self):
        return [self.backbone]

    def _forward_padded(self, input_ids, attention_mask, token_type_ids):
        extra = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state
        return self.head(hidden, attention_mask)

    def _forward_packed(self, inputs):
        hidden = self.backbone(**inputs.model_kwargs()).last_hidden_state
        return self.head.forward_packed(hidden, inputs.cu_seq_lens)


def _detect(files) -> bool:
    # More than a lone Transformer (its chain is validated when loading); a lone one is judged by its config.
    return files.modules is not None and len(files.modules) > 1


FAMILY = Family(name="modular", detect=_detect, load_encoder=load_encoder, scorer=ModularScorer,
                supports="modular Sentence Transformers cross-encoders (modules.json: Transformer, Pooling, Dense)")
