"""Hub downloads against a local stand-in for the Hub's HTTP API (tests never use the network)."""
from __future__ import annotations

import hashlib
import json
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from models import ModelLoadError, load_encoder, resolve_model_dir
from models.hub import count_parameters
from tests.tiny_models import build_modular, build_qwen3_reranker, build_xlmr_seq_cls

COMMIT = "a" * 40


class FakeHub:
    """Serves the repositories in `repos` ({"org/name": folder}) the way huggingface_hub reads them: model info
    with siblings, the recursive tree, and resolve/ HEAD + GET with ETag and X-Repo-Commit. Records requests."""

    def __init__(self, repos: dict[str, Path]):
        self.repos, self.requests, self.headers = repos, [], []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                hub.serve(self, body=True)

            def do_HEAD(self):
                hub.serve(self, body=False)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def _files(self, root: Path):
        return [p for p in sorted(root.rglob("*")) if p.is_file()]

    def serve(self, h: BaseHTTPRequestHandler, body: bool):
        self.requests.append((h.command, h.path))
        self.headers.append({k.lower(): v for k, v in h.headers.items()})
        for repo, root in self.repos.items():
            if h.path.startswith(f"/api/models/{repo}/tree/"):
                return self._send(h, body, json.dumps([
                    {"type": "file", "path": p.relative_to(root).as_posix(), "size": p.stat().st_size,
                     "oid": hashlib.sha1(p.read_bytes()).hexdigest()} for p in self._files(root)]).encode())
            if h.path.startswith(f"/api/models/{repo}/revision/"):
                return self._send(h, body, json.dumps({"id": repo, "sha": COMMIT, "siblings": [
                    {"rfilename": p.relative_to(root).as_posix()} for p in self._files(root)]}).encode())
            prefix = f"/{repo}/resolve/"
            if h.path.startswith(prefix):
                name = h.path[len(prefix):].partition("/")[2]
                if (root / name).is_file():
                    data = (root / name).read_bytes()
                    return self._send(h, body, data, {"ETag": f'"{hashlib.sha1(data).hexdigest()}"',
                                                      "X-Repo-Commit": COMMIT})
                return self._send(h, body, b"", status=404, headers={"X-Error-Code": "EntryNotFound"})
        self._send(h, body, b"", status=404, headers={"X-Error-Code": "RepoNotFound"})

    @staticmethod
    def _send(h, body, data: bytes, headers=None, status=200):
        h.send_response(status)
        for key, value in (headers or {}).items():
            h.send_header(key, value)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if body:
            h.wfile.write(data)

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hub(tiny, tmp_path, monkeypatch):
    # A modular model whose Dense modules are saved as pytorch_model.bin, with a stale *.bin next to the root
    # safetensors and an ONNX export: what a real repository may hold.
    import torch
    from safetensors.torch import load_file

    modular = tmp_path / "repo_modular"
    shutil.copytree(tiny["modular"], modular)
    for folder in ("2_Dense", "4_Dense"):
        torch.save(load_file(str(modular / folder / "model.safetensors")), modular / folder / "pytorch_model.bin")
        (modular / folder / "model.safetensors").unlink()
    shutil.copy(modular / "model.safetensors", modular / "pytorch_model.bin")
    (modular / "onnx").mkdir()
    (modular / "onnx" / "model.onnx").write_bytes(b"\0" * 100)
    no_config = tmp_path / "repo_no_config"
    shutil.copytree(tiny["bert"], no_config)
    (no_config / "config.json").unlink()
    fake = FakeHub({"org/tiny-modular": modular, "org/no-config": no_config})
    monkeypatch.setenv("HF_ENDPOINT", fake.url)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    yield fake
    fake.close()


def test_downloads_only_the_needed_files(hub, tiny):
    path = resolve_model_dir("org/tiny-modular")
    got = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())
    assert "pytorch_model.bin" not in got and "onnx/model.onnx" not in got and "README.md" not in got
    assert {"modules.json", "model.safetensors", "config.json", "tokenizer.json", "2_Dense/pytorch_model.bin",
            "3_LayerNorm/model.safetensors", "1_Pooling/config.json"} <= set(got)
    assert load_encoder("org/tiny-modular").model_id == "org/tiny-modular"


def weight_files(path: Path) -> list[str]:
    return sorted(p.relative_to(path).as_posix() for p in path.rglob("*")
                  if p.is_file() and p.suffix in (".safetensors", ".bin"))


@pytest.fixture
def causal_hub(tmp_path, monkeypatch):
    """A Sentence Transformers causal CrossEncoder on the stand-in Hub: its prompt comes from chat_template.jinja."""
    from tests.llm_rerankers import build_st_causal

    root = build_st_causal(tmp_path / "st_causal")
    assert (root / "chat_template.jinja").is_file()  # the layout transformers saves, which the test is about
    fake = FakeHub({"org/st-causal": root})
    monkeypatch.setenv("HF_ENDPOINT", fake.url)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    yield fake, root
    fake.close()


@pytest.mark.parametrize("repo", ["org/tiny-modular", "org/st-causal"])
def test_the_ingress_encoder_downloads_no_weights_and_encodes_as_the_local_model(repo, request, tiny):
    """load_encoder (the ingress) fetches configs and tokenizer files only; its encodings equal those of the
    whole model directory. Then the replica's resolve fetches the weights into the same snapshot."""
    local = tiny["modular"] if repo == "org/tiny-modular" else request.getfixturevalue("causal_hub")[1]
    if repo == "org/tiny-modular":
        request.getfixturevalue("hub")
    encoder = load_encoder(repo)
    snapshot = resolve_model_dir(repo, weights=False)  # the same snapshot, already complete: no new download
    assert weight_files(snapshot) == []
    items = [("what is packed attention", "sequences in one row with their own boundaries"),
             ("a query", "a much longer document " * 20)]
    got, want = encoder.encode(items), load_encoder(str(local)).encode(items)
    assert got.input_ids.tolist() == want.input_ids.tolist() and got.offsets.tolist() == want.offsets.tolist()
    assert weight_files(resolve_model_dir(repo)) != []


def test_missing_repository_names_the_model(hub):
    with pytest.raises(ModelLoadError, match="org/missing.*repository not found"):
        resolve_model_dir("org/missing")


def test_repository_without_config(hub):
    with pytest.raises(ModelLoadError, match="config.json"):
        resolve_model_dir("org/no-config")


def test_file_list_is_one_model_info_request_carrying_the_token(hub):
    resolve_model_dir("org/tiny-modular", token="hf_secret")
    listing = [i for i, (_, path) in enumerate(hub.requests) if path.startswith("/api/models/")]
    assert [hub.requests[i] for i in listing[:1]] == [("GET", "/api/models/org/tiny-modular/revision/main")]
    assert hub.headers[listing[0]].get("authorization") == "Bearer hf_secret"


# ---- parameter counts, against the reference implementations ---------------------------------------------

@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_presets")
    return {"modular": build_modular(root / "modular"), "xlmr": build_xlmr_seq_cls(root / "xlmr"),
            "qwen3_tied": build_qwen3_reranker(root / "qwen3_tied", tied=True),
            "qwen3_untied": build_qwen3_reranker(root / "qwen3_untied", tied=False, seed=6)}


def _unique_parameters(module) -> int:
    return sum(p.numel() for p in module.parameters())  # parameters() yields tied weights once


@pytest.mark.parametrize("name", ["xlmr", "qwen3_tied", "qwen3_untied"])
def test_count_parameters_matches_transformers(tiny_dirs, name):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    loader = AutoModelForCausalLM if name.startswith("qwen3") else AutoModelForSequenceClassification
    assert count_parameters(tiny_dirs[name]) == _unique_parameters(loader.from_pretrained(tiny_dirs[name]))


def test_count_parameters_of_a_modular_cross_encoder_matches_sentence_transformers(tiny_dirs):
    from sentence_transformers import CrossEncoder

    reference = _unique_parameters(CrossEncoder(str(tiny_dirs["modular"]), device="cpu"))
    assert count_parameters(tiny_dirs["modular"]) == reference


def test_count_parameters_unknown_is_none(tmp_path):
    assert count_parameters(tmp_path) is None
    assert count_parameters(str(tmp_path / "nowhere" / "model")) is None  # not a dir, no Hub here


def test_count_parameters_reads_a_cached_hub_snapshot_without_the_network(tiny_dirs, tmp_path, monkeypatch):
    """A node that served the model before has its files in the HF cache: no Hub request is needed."""
    import shutil

    import models.hub

    commit = "0" * 40
    repo = tmp_path / "hub" / "models--org--tiny"
    shutil.copytree(tiny_dirs["xlmr"], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(models.hub, "_count_on_hub", lambda *a, **k: pytest.fail("asked the Hub"))
    assert count_parameters("org/tiny") == count_parameters(tiny_dirs["xlmr"]) > 0


def test_count_parameters_gives_up_on_a_silent_hub_within_its_timeout(monkeypatch):
    import time

    import models.hub

    monkeypatch.setattr(models.hub, "_count_on_hub", lambda *a, **k: time.sleep(30))
    start = time.monotonic()
    assert count_parameters("org/not-cached", timeout_s=0.5) is None
    assert time.monotonic() - start < 2


def test_count_parameters_asks_the_hub_when_the_cached_snapshot_lacks_a_shard(tiny_dirs, tmp_path, monkeypatch):
    import shutil

    import models.hub

    commit = "0" * 40
    repo = tmp_path / "hub" / "models--org--sharded"
    shutil.copytree(tiny_dirs["xlmr"], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (repo / "snapshots" / commit / "model.safetensors.index.json").write_text(json.dumps(index))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(models.hub, "_count_on_hub", lambda *a, **k: 123)
    assert count_parameters("org/sharded") == 123
