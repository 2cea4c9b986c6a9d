"""Model replicas sharing hardware: CPU replicas sizing their threads per forward from their node's registry,
a fractional GPU share capping the replica's memory and failing the deploy when the model does not fit it (on
CPU: a fake torch.cuda), /info reporting both, and the build-time placement check on a real (fixed) cluster."""
from __future__ import annotations

import time

import numpy as np
import pytest
import requests
import torch

import models
from deployments.model import ModelReplica
from models.device_share import GPU_CONTEXT_RESERVE_BYTES
from models.errors import ModelLoadError
from serve_app.settings import ModelSettings
from tests.serve_helpers import run_app, wait_for

GIB = 2**30


# --- a CPU replica in this process ---------------------------------------------------------------------------

def test_a_cpu_replica_runs_each_forward_with_the_threads_its_slots_allow(tiny):
    r = ModelReplica(ModelSettings(name="shared", model_id=str(tiny["bert"])))
    try:
        assert r.threads_from == "node share" and r.cpu_share is not None
        batch = r.scorer.encoder.encode([("q", "a short document")] * 3)
        assert r._forward_sync(batch).shape == (3,)
        threads = r.torch_threads
        assert 1 <= threads <= r.cpus_seen
        assert r._executor.submit(torch.get_num_threads).result() == threads  # set where the forward runs
        info = r.describe()
        assert info["torch_threads_from"] == "node share" and "node share: ceil(" in info["torch_threads_why"]
        mine = [x for x in info["cpu_node"]["replicas"] if x["model"] == "shared"]
        assert len(mine) == 1 and mine[0]["torch_threads"] == threads and info["gpu_memory"] is None
    finally:
        r.cpu_share.close()


def test_an_explicit_num_cpus_keeps_its_threads(tiny):
    r = ModelReplica(ModelSettings(name="pinned", model_id=str(tiny["bert"]), num_cpus=1))
    try:
        r._forward_sync(r.scorer.encoder.encode([("q", "d")]))
        info = r.describe()
        assert info["torch_threads"] == 1 and info["torch_threads_from"] == "num_cpus"
        assert info["torch_threads_why"].startswith("num_cpus set: 1 thread(s)")
    finally:
        r.cpu_share.close()


# --- a GPU share, on CPU: a fake torch.cuda -------------------------------------------------------------------

@pytest.fixture
def fake_gpu(monkeypatch):
    """torch.cuda of a 24 GiB device as far as the memory cap goes; the recorded caps."""
    caps = []
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda i: type("P", (), {"total_memory": 24 * GIB})())
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f, i: caps.append(f))
    return caps


class ShareScorer:
    """A loaded model as the replica sees it; forwards of more than `fits` tokens run out of memory."""

    family, dtype, device, execution, num_parameters = "seq_cls", "bfloat16", "cuda", "packed", 1000
    prefix_sharing = False  # an encoder family: no prefix to share

    def __init__(self, encoder, token_budget, fits):
        self.encoder, self.token_budget, self.max_length, self.fits = encoder, token_budget, encoder.max_length, fits
        self.scored = []

    def score(self, batch):
        self.scored.append(int(batch.num_tokens))
        if batch.num_tokens > self.fits:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {batch.num_tokens} MiB")
        return np.zeros(len(batch), dtype=np.float32)

    def computed_tokens(self, batch):
        return int(batch.num_tokens)

    def warmup(self):
        return self.score(self.encoder.encode([("warm-up query", "a short warm-up passage")]))


def loaded(monkeypatch, tiny, fits):
    """models.load_scorer replaced by a ShareScorer over the tiny BERT's encoder; the kwargs it got."""
    got = {}
    encoder = models.load_encoder(str(tiny["bert"]))

    def load_scorer(model_id, **kw):
        got.update(kw)
        if fits == 0:
            raise ModelLoadError(model_id, "loading failed") from torch.OutOfMemoryError("CUDA out of memory")
        got["scorer"] = ShareScorer(encoder, kw["token_budget"], fits)
        return got["scorer"]

    monkeypatch.setattr(models, "load_scorer", load_scorer)
    return got


def gpu_settings(tiny, **kw):
    return ModelSettings(name="ettin-share", model_id=str(tiny["bert"]), dtype="bfloat16", **kw)


def test_a_gpu_share_caps_memory_sizes_the_budget_and_checks_a_full_budget_forward(tiny, fake_gpu, monkeypatch):
    got = loaded(monkeypatch, tiny, fits=10**9)
    r = ModelReplica(gpu_settings(tiny, num_gpus=0.25))
    assert fake_gpu == [(6 * GIB - GPU_CONTEXT_RESERVE_BYTES) / (24 * GIB)]  # capped before anything loaded
    assert got["device"] == "cuda" and got["token_budget"] == 16384 and r.token_budget == 16384
    assert r.cpu_share is None  # a GPU replica takes no CPU slots
    assert max(got["scorer"].scored) > 16384 - got["scorer"].max_length  # the probe filled the budget
    assert r.describe()["gpu_memory"] == {"num_gpus": 0.25, "memory_cap_gib": 5.5, "device_memory_gib": 24.0}


def test_weights_that_do_not_fit_the_share_fail_the_deploy_naming_model_and_setting(tiny, fake_gpu, monkeypatch):
    loaded(monkeypatch, tiny, fits=0)
    with pytest.raises(ModelLoadError, match="model 'ettin-share': its weights and warm-up batch does not fit its "
                                             "GPU share: num_gpus 0.25 caps this replica at 5.50 GiB.*raise num_gpus"):
        ModelReplica(gpu_settings(tiny, num_gpus=0.25))


def test_a_token_budget_the_share_cannot_run_fails_the_deploy(tiny, fake_gpu, monkeypatch):
    loaded(monkeypatch, tiny, fits=5000)  # the warm-up fits, a 16384-token forward does not
    with pytest.raises(ModelLoadError, match=r"model 'ettin-share': a forward of its token budget \(16384 tokens\) "
                                             "does not fit its GPU share.*set a smaller token_budget or raise num_gpus"):
        ModelReplica(gpu_settings(tiny, num_gpus=0.25))
    got = loaded(monkeypatch, tiny, fits=5000)
    r = ModelReplica(gpu_settings(tiny, num_gpus=0.25, token_budget=4096))  # a budget that fits: deploys
    assert r.token_budget == 4096 and got["token_budget"] == 4096


def test_a_share_too_small_for_a_cuda_context_fails_before_loading(tiny, fake_gpu, monkeypatch):
    got = loaded(monkeypatch, tiny, fits=10**9)
    with pytest.raises(ModelLoadError, match="model 'ettin-share': invalid GPU share: num_gpus 0.01 is 0.24 GiB"):
        ModelReplica(gpu_settings(tiny, num_gpus=0.01))
    assert got == {}  # nothing loaded


# --- on Ray -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sharing_url(serve_url, tiny):
    """Two CPU models with the default layout (no num_cpus): their replicas share the node."""
    from ray import serve

    run_app({"models": [{"name": "share-a", "model_id": str(tiny["modular"])},
                        {"name": "share-b", "model_id": str(tiny["bert"])}], "api_key": None},
            name="sharing", route_prefix="/sharing")
    yield serve_url + "/sharing"
    serve.delete("sharing")


def test_info_shows_each_models_threads_and_why(sharing_url):
    r = requests.post(sharing_url + "/rerank", json={"model": "share-a", "query": "q", "texts": ["a", "b c"]},
                      timeout=60)
    assert r.status_code == 200, r.text
    time.sleep(1.2)  # past the ingress's describe cache and the active window: share-a ran alone
    info = requests.get(sharing_url + "/info", timeout=60).json()
    by_name = {m["name"]: m["serving"] for m in info["models"]}
    for name, serving in by_name.items():
        cpus = serving["cpus_seen"]
        assert serving["torch_threads_from"] == "node share" and "node share: ceil(" in serving["torch_threads_why"]
        assert 1 <= serving["torch_threads"] <= cpus
        node = serving["node"]
        assert node["cpus"] == cpus and {"share-a", "share-b"} <= set(node["models"]) and node["cpu_replicas"] >= 2
        (replica,) = serving["replicas"]  # one replica of each model, on the node of the one that answered
        assert replica["torch_threads_from"] == "node share" and replica["active"] is False
    # share-a's one forward found the node idle: it ran on every CPU its replica sees.
    assert by_name["share-a"]["replicas"][0]["torch_threads"] == by_name["share-a"]["cpus_seen"]
    assert by_name["share-b"]["replicas"][0]["torch_threads"] in range(1, by_name["share-b"]["cpus_seen"] + 1)


def test_the_build_fails_when_the_fixed_cluster_cannot_place_the_replicas(serve_url, tiny):
    from serve_app import build_app
    from serve_app.placement import fixed_cluster_nodes

    wait_for(lambda: fixed_cluster_nodes() is not None, 60, "Ray's autoscaler to report the (fixed) test cluster")
    with pytest.raises(ValueError, match="model 'on-gpu': 1 of 1 replica"):
        build_app({"models": [{"name": "on-gpu", "model_id": str(tiny["bert"]), "num_gpus": 0.5}]})
    many = [{"name": f"m{i}", "model_id": str(tiny["bert"]), "num_cpus": 1} for i in range(6)]
    with pytest.raises(ValueError, match="asks for 6.25 CPU and 0 GPU at once; the cluster has 4 CPU"):
        build_app({"models": many})
