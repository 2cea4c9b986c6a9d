"""Reading parts of a checkpoint without loading the model: rows of one tensor (the causal families' score-token
rows of lm_head) and every tensor under a prefix (jina-reranker-v3's projector), from each layout a checkpoint
comes in: one safetensors file, sharded safetensors with an index, or pytorch *.bin only."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from models.causal_lm import read_weight_rows
from models.errors import ModelLoadError
from models.families.jina_v3 import read_tensors

STATE = {name: torch.randn(shape, generator=torch.Generator().manual_seed(i))
         for i, (name, shape) in enumerate([("model.embed.weight", (6, 3)), ("projector.0.weight", (4, 3)),
                                             ("projector.2.weight", (2, 4)), ("lm_head.weight", (6, 3))])}


def save(layout: str, path):
    path.mkdir()
    if layout == "single":
        save_file(STATE, str(path / "model.safetensors"))
    elif layout == "sharded":
        names = sorted(STATE)
        shards = {"model-00001-of-00002.safetensors": names[:2], "model-00002-of-00002.safetensors": names[2:]}
        for file, members in shards.items():
            save_file({n: STATE[n] for n in members}, str(path / file))
        weight_map = {n: file for file, members in shards.items() for n in members}
        (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    else:
        torch.save(STATE, path / "pytorch_model.bin")
    return path


@pytest.mark.parametrize("layout", ["single", "sharded", "bin"])
def test_rows_of_one_tensor(layout, tmp_path):
    path = save(layout, tmp_path / layout)
    torch.testing.assert_close(read_weight_rows("m", path, "lm_head.weight", [4, 1]), STATE["lm_head.weight"][[4, 1]])
    with pytest.raises(ModelLoadError, match="tensor lm_head.bias (missing from the checkpoint|not found)"):
        read_weight_rows("m", path, "lm_head.bias", [0])


@pytest.mark.parametrize("layout", ["single", "sharded", "bin"])
def test_every_tensor_under_a_prefix(layout, tmp_path):
    got = read_tensors("m", save(layout, tmp_path / layout), "projector.")
    assert sorted(got) == ["projector.0.weight", "projector.2.weight"]
    for name, tensor in got.items():
        torch.testing.assert_close(tensor, STATE[name])
    assert read_tensors("m", tmp_path / layout, "absent.") == {}
