"""AppSettings validation, the settings -> Ray options mapping, and build_app's checks before deploying."""
from __future__ import annotations

import pytest
from pydantic import ValidationError
from ray.serve import Application

from models.errors import ModelLoadError
from serve_app import AppSettings, ModelSettings, build_app, deployment_options
from serve_app.builder import check_model_source, ingress_options
from serve_app.settings import DEFAULT_MODEL_ID, deployment_name


@pytest.fixture(autouse=True)
def _no_env_secrets(monkeypatch):
    monkeypatch.delenv("RERANK_API_KEY", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)


def test_defaults_serve_ettin_17m_on_cpu():
    s = AppSettings()
    (m,) = s.models
    assert m.model_id == DEFAULT_MODEL_ID and m.name == DEFAULT_MODEL_ID and s.default_model == DEFAULT_MODEL_ID
    assert m.family == "auto" and m.dtype == "auto" and m.resolved_device == "cpu"
    assert 0 < m.resolved_num_cpus < 1  # fractional: several models fit on a 2-core `serve run`
    assert s.max_body_bytes == 4 * 1024 * 1024 and s.max_candidates == 1000 and s.api_key is None


def test_dict_and_model_give_the_same_settings():
    raw = {"models": [{"name": "a", "model_id": "org/a", "max_length": 128}, {"model_id": "org/b"}],
           "default_model": "org/b", "max_candidates": 10}
    s = AppSettings.model_validate(raw)
    assert [m.name for m in s.models] == ["a", "org/b"] and s.default_model == "org/b"
    assert s.models[0].max_length == 128 and s.max_candidates == 10
    assert AppSettings(**raw) == s


def test_local_directory_is_named_by_its_basename(tmp_path):
    d = tmp_path / "my-reranker"
    d.mkdir()
    assert ModelSettings(model_id=str(d)).name == "my-reranker"


def test_gpu_share_serves_on_cuda_with_a_whole_cpu():
    m = ModelSettings(model_id="org/a", num_gpus=0.25)
    assert m.resolved_device == "cuda" and m.resolved_num_cpus == 1.0
    opts = deployment_options(m)
    assert opts["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 0.25}


def test_secrets_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("RERANK_API_KEY", "k1")
    monkeypatch.setenv("HF_TOKEN", "hf_x")
    s = AppSettings()
    assert s.api_key.get_secret_value() == "k1" and s.hf_token.get_secret_value() == "hf_x"
    assert "k1" not in repr(s)  # never printed in logs
    assert AppSettings(api_key="given").api_key.get_secret_value() == "given"
    assert AppSettings(api_key="").api_key is None


@pytest.mark.parametrize("raw, fragment", [
    ({"models": []}, "at least 1"),
    ({"models": [{"name": "a", "model_id": "x/a"}, {"name": "a", "model_id": "x/b"}]}, "distinct name"),
    ({"models": [{"name": "a/b", "model_id": "x/a"}, {"name": "a-b", "model_id": "x/b"}]}, "distinct name"),
    ({"models": [{"name": "a", "model_id": "x/a"}], "default_model": "b"}, "default_model"),
    ({"models": [{"model_id": "x/a", "family": "gpt"}]}, "family"),
    ({"models": [{"model_id": "x/a", "dtype": "int3"}]}, "dtype"),
    ({"models": [{"model_id": "x/a", "max_length": 0}]}, "max_length"),
    ({"models": [{"model_id": "x/a", "num_cpus": -1}]}, "num_cpus"),
    ({"models": [{"model_id": "x/a", "num_replicas": 0}]}, "num_replicas"),
    ({"models": [{"model_id": "x/a", "num_replicas": 2, "autoscaling_config": {"max_replicas": 3}}]},
     "either num_replicas or autoscaling_config"),
    ({"models": [{"model_id": "x/a", "device": "cuda"}]}, "num_gpus"),
    ({"models": [{"model_id": "x/a", "bogus": 1}]}, "bogus"),
    ({"models": [{"name": "bad name!", "model_id": "x/a"}]}, "name"),
    ({"models": [{"name": "a"}]}, "model_id"),
    ({"max_candidates": 0}, "max_candidates"),
    ({"unknown_top_level": True}, "unknown_top_level"),
])
def test_bad_settings_are_rejected_with_a_message(raw, fragment):
    with pytest.raises(ValidationError) as e:
        AppSettings.model_validate(raw)
    assert fragment in str(e.value)


def test_deployment_options_cpu_defaults():
    m = ModelSettings(name="tiny", model_id="org/tiny", max_queued_requests=8, retry_after_s=2)
    opts = deployment_options(m)
    assert opts["name"] == "model-tiny" and opts["num_replicas"] == 1
    assert opts["ray_actor_options"] == {"num_cpus": 0.5}
    assert opts["max_queued_requests"] == 8
    assert opts["backpressure_config"] == {"status_code": 429, "retry_after_s": 2}
    assert "autoscaling_config" not in opts


def test_deployment_options_autoscaling_and_accelerator():
    m = ModelSettings(model_id="org/x", autoscaling_config={"min_replicas": 1, "max_replicas": 4},
                      num_gpus=1, accelerator_type="H100", max_queued_requests=-1)
    opts = deployment_options(m)
    assert opts["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4} and "num_replicas" not in opts
    assert opts["ray_actor_options"]["accelerator_type"] == "H100"
    assert "backpressure_config" not in opts  # unbounded queue: nothing is ever rejected


def test_deployment_options_are_accepted_by_ray():
    from deployments.model import ModelDeployment
    m = ModelSettings(model_id="org/x", autoscaling_config={"min_replicas": 1, "max_replicas": 4})
    d = ModelDeployment.options(**deployment_options(m))
    assert d.name == deployment_name("org/x") == "model-org-x"
    assert d.backpressure_config.status_code == 429


def test_ingress_options():
    s = AppSettings(ingress={"num_replicas": 2, "num_cpus": 0.5})
    assert ingress_options(s)["num_replicas"] == 2 and ingress_options(s)["ray_actor_options"] == {"num_cpus": 0.5}


def test_build_app_takes_a_dict_or_settings_and_binds_one_deployment_per_model():
    raw = {"models": [{"name": "a", "model_id": "org/a"}, {"name": "b", "model_id": "org/b", "num_gpus": 1}],
           "default_model": "b"}
    for args in (raw, AppSettings.model_validate(raw)):
        app = build_app(args)
        assert isinstance(app, Application)
        ingress = app._bound_deployment
        settings, handles = ingress.init_args
        assert isinstance(settings, AppSettings) and settings.default_model == "b"
        assert {n: h._bound_deployment.name for n, h in handles.items()} == {"a": "model-a", "b": "model-b"}
        assert handles["b"]._bound_deployment.ray_actor_options["num_gpus"] == 1


def test_build_app_rejects_bad_args():
    with pytest.raises(ValidationError):
        build_app({"models": [{"name": "a", "model_id": "org/a"}], "default_model": "zzz"})


def test_build_app_fails_fast_on_a_missing_local_model(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(ModelLoadError, match="nowhere"):
        build_app({"models": [{"name": "gone", "model_id": str(missing)}]})


def test_build_app_fails_fast_on_an_unsupported_local_model(tmp_path):
    (tmp_path / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}')
    with pytest.raises(ModelLoadError, match="unsupported architecture"):
        check_model_source(ModelSettings(name="gpt", model_id=str(tmp_path)))
