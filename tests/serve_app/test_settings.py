"""AppSettings validation, the settings -> Ray options mapping, and build_app's checks before deploying."""
from __future__ import annotations

import pytest
from pydantic import ValidationError
from ray.serve import Application

from models.errors import ModelLoadError
from models.hub import resolve_model_dir
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
    ({"models": [{"model_id": "x/a", "long_documents": "bogus"}]}, "long_documents"),
    ({"models": [{"model_id": "x/a", "chunk_overlap": -1}]}, "chunk_overlap"),
    ({"models": [{"model_id": "x/a", "max_chunks": 0}]}, "max_chunks"),
    ({"models": [{"model_id": "x/a", "shared_prefix": "on"}]}, "shared_prefix"),
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
    opts = deployment_options(m, num_parameters=596_000_000)
    scaling = opts["autoscaling_config"]
    assert (scaling["min_replicas"], scaling["max_replicas"]) == (1, 4) and "num_replicas" not in opts
    assert scaling["policy"]["policy_function"] == "autoscaling.policy:WorkPolicy"
    assert scaling["upscale_delay_s"] == 10 and opts["graceful_shutdown_timeout_s"] == 60  # "small" class
    assert opts["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 1, "accelerator_type": "H100"}
    assert opts["max_queued_requests"] == -1
    assert "backpressure_config" not in opts  # unbounded queue: nothing is ever rejected


def test_num_replicas_auto_is_the_default_preset_never_rays_auto():
    m = ModelSettings(model_id="org/x", num_replicas="auto", token_budget=1000)
    opts = deployment_options(m, num_parameters=17_000_000)
    assert "num_replicas" not in opts  # "auto" would make Ray merge its own defaults into ours
    kwargs = opts["autoscaling_config"]["policy"]["policy_kwargs"]
    assert kwargs == {"metric": "tokens", "target_per_replica": 2000.0}  # balanced: 2 token budgets
    assert opts["autoscaling_config"]["upscale_delay_s"] == 5  # the "tiny" class
    assert opts["max_ongoing_requests"] == 32 and opts["max_queued_requests"] == 256


def test_preset_decides_max_ongoing_requests_unless_the_model_sets_it():
    latency = {"preset": "latency"}
    assert deployment_options(ModelSettings(model_id="org/x", autoscaling_config=latency),
                              num_parameters=None)["max_ongoing_requests"] == 16
    assert deployment_options(ModelSettings(model_id="org/x", autoscaling_config=latency, max_ongoing_requests=40),
                              num_parameters=None)["max_ongoing_requests"] == 40


def test_scale_to_zero_queues_without_bound_unless_the_model_sets_a_bound():
    m = ModelSettings(model_id="org/x", autoscaling_config={"preset": "scale-to-zero"})
    opts = deployment_options(m, num_parameters=None)
    assert (opts["autoscaling_config"]["min_replicas"], opts["autoscaling_config"]["initial_replicas"]) == (0, 1)
    # A cold start queues every request at the caller's handle: a bound would 429 the tail of the burst.
    assert opts["max_queued_requests"] == -1 and "backpressure_config" not in opts
    bounded = ModelSettings(model_id="org/x", autoscaling_config={"min_replicas": 0}, max_queued_requests=50)
    opts = deployment_options(bounded, num_parameters=None)
    assert opts["max_queued_requests"] == 50 and opts["backpressure_config"]["status_code"] == 429


def test_fixed_preset_gives_plain_replicas():
    m = ModelSettings(model_id="org/x", autoscaling_config={"preset": "fixed", "num_replicas": 3})
    opts = deployment_options(m, num_parameters=None)
    assert opts["num_replicas"] == 3 and "autoscaling_config" not in opts


@pytest.mark.parametrize("scaling, fragment", [
    ({"min_replica": 2}, "min_replica"),  # Ray itself drops unknown keys without a word
    ({"preset": "warp-speed"}, "unknown autoscaling preset"),
    ({"min_replicas": 3, "max_replicas": 2}, "max_replicas (2) must be greater"),  # Ray's own check
    ({"metric": "pairs"}, "target_work_per_replica"),
    ({"policy": {"policy_function": "no_such_module:policy"}}, "no_such_module"),
    ({"preset": "fixed", "max_replicas": 2}, "only num_replicas"),
])
def test_bad_autoscaling_is_rejected_at_validation_naming_the_model(scaling, fragment):
    with pytest.raises(ValidationError) as e:
        AppSettings.model_validate({"models": [{"name": "m1", "model_id": "x/a", "autoscaling_config": scaling}]})
    assert fragment in str(e.value) and "model 'm1': invalid autoscaling_config" in str(e.value)


def test_autoscaling_config_is_kept_as_written():
    m = ModelSettings(model_id="x/a", autoscaling_config={"preset": "latency", "min_replicas": 2})
    assert m.autoscaling_config.preset == "latency" and m.autoscaling_config.ray_overrides == {"min_replicas": 2}
    assert m.autoscaling_config.given() == {"preset": "latency", "min_replicas": 2}  # what /info shows


def test_bad_ingress_autoscaling_is_rejected():
    with pytest.raises(ValidationError, match="max_replica"):
        AppSettings(ingress={"autoscaling_config": {"max_replica": 3}})
    with pytest.raises(ValidationError, match="must be greater"):
        AppSettings(ingress={"autoscaling_config": {"min_replicas": 3, "max_replicas": 2}})
    with pytest.raises(ValidationError, match="ingress: invalid autoscaling_config"):
        AppSettings(ingress={"autoscaling_config": "fast"})
    ok = AppSettings(ingress={"autoscaling_config": {"min_replicas": 1, "max_replicas": 4}})
    assert ingress_options(ok)["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4}
    assert ok.ingress.autoscaling_config.given() == {"min_replicas": 1, "max_replicas": 4}  # what /info shows


def test_build_app_sizes_local_models_from_their_safetensors(tmp_path):
    from tests.tiny_models import build_modular

    path = build_modular(tmp_path / "tiny-modular")
    app = build_app({"models": [{"name": "t", "model_id": str(path), "num_replicas": "auto"}]})
    (handle,) = app._bound_deployment.init_args[1].values()
    scaling = handle._bound_deployment._deployment_config.autoscaling_config
    assert scaling.upscale_delay_s == 5 and scaling.downscale_delay_s == 120  # "tiny", not the unknown "small"


@pytest.fixture()
def no_fetch_check(monkeypatch):
    """build_app without its check that Hub models can be fetched: these tests bind made-up Hub ids."""
    monkeypatch.setenv("RERANK_SKIP_FETCH_CHECK", "1")


def test_build_app_never_stalls_on_an_unreachable_hub(monkeypatch, no_fetch_check):
    """Sizing Hub models asks the Hub for headers; a silent network costs one bounded wait, not one per model."""
    import time

    import models.hub
    import serve_app.builder

    def hang(*_args, **_kwargs):
        time.sleep(30)

    monkeypatch.setattr(models.hub, "_count_on_hub", hang)
    monkeypatch.setattr(serve_app.builder, "COUNT_TIMEOUT_S", 1.0)
    models = [{"name": f"m{i}", "model_id": f"org/m{i}", "num_replicas": "auto"} for i in range(4)]
    start = time.monotonic()
    app = build_app({"models": models})
    assert time.monotonic() - start < 3.0  # four lookups at once, each given up after 1 s
    for handle in app._bound_deployment.init_args[1].values():
        assert handle._bound_deployment._deployment_config.autoscaling_config.upscale_delay_s == 10  # "small"


def test_deployment_options_are_accepted_by_ray():
    from deployments.model import ModelDeployment
    m = ModelSettings(model_id="org/x", autoscaling_config={"min_replicas": 1, "max_replicas": 4})
    d = ModelDeployment.options(**deployment_options(m))
    assert d.name == deployment_name("org/x") == "model-org-x"
    assert d.backpressure_config.status_code == 429


def test_ingress_options():
    s = AppSettings(ingress={"num_replicas": 2, "num_cpus": 0.5})
    assert ingress_options(s)["num_replicas"] == 2 and ingress_options(s)["ray_actor_options"] == {"num_cpus": 0.5}


def test_build_app_takes_a_dict_or_settings_and_binds_one_deployment_per_model(no_fetch_check):
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


@pytest.mark.parametrize("model_id", ["models/rerankers/missing", "./missing", "~/missing-model"])
def test_every_layer_takes_the_same_ids_for_local_paths(model_id):
    # One rule (models.hub.is_local_path): named by the last component, rejected at build when missing,
    # and never sent to the Hub.
    model = ModelSettings(model_id=model_id)
    assert model.name == model_id.rsplit("/", 1)[-1]
    with pytest.raises(ModelLoadError, match="no such local directory"):
        check_model_source(model)
    with pytest.raises(ModelLoadError, match="no such local directory"):
        resolve_model_dir(model_id)


def test_build_app_fails_fast_on_an_unsupported_local_model(tmp_path):
    (tmp_path / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}')
    with pytest.raises(ModelLoadError, match="unsupported architecture"):
        check_model_source(ModelSettings(name="gpt", model_id=str(tmp_path)))


@pytest.mark.parametrize("setting, value", [("chunk_overlap", -1), ("max_chunks", 0), ("long_documents", "bogus")])
def test_build_app_fails_on_bad_long_document_settings_naming_them(setting, value):
    """A failed deploy before anything starts, with the setting's name in the message (docs/API.md)."""
    with pytest.raises(ValidationError) as e:
        build_app({"models": [{"model_id": "x/a", setting: value}]})
    assert setting in str(e.value)


def test_long_document_settings_defaults():
    m = AppSettings.model_validate({"models": [{"model_id": "x/a"}]}).models[0]
    assert (m.long_documents, m.chunk_overlap, m.max_chunks) == ("truncate", 64, 32)
    m = AppSettings.model_validate({"models": [{"model_id": "x/a", "long_documents": "chunk", "chunk_overlap": 0,
                                                "max_chunks": 1}]}).models[0]
    assert (m.long_documents, m.chunk_overlap, m.max_chunks) == ("chunk", 0, 1)


def test_shared_prefix_is_auto_unless_turned_off():
    assert AppSettings.model_validate({"models": [{"model_id": "x/a"}]}).models[0].shared_prefix == "auto"
    m = AppSettings.model_validate({"models": [{"model_id": "x/a", "shared_prefix": "off"}]}).models[0]
    assert m.shared_prefix == "off"
    with pytest.raises(ValidationError) as e:  # a failed deploy naming the setting, before anything starts
        build_app({"models": [{"model_id": "x/a", "shared_prefix": True}]})
    assert "shared_prefix" in str(e.value)


# --- `serve run serve_app:build_app model_id=...`: one model from the command line ------------------------------

def test_one_model_shorthand_from_the_strings_ray_passes():
    # `serve run` hands the builder its key=value pairs as a dict of strings.
    settings = AppSettings.model_validate({"model_id": "BAAI/bge-reranker-v2-m3", "num_gpus": "1",
                                           "max_length": "512", "dtype": "float16", "family": "seq_cls",
                                           "num_replicas": "auto", "max_candidates": "200"})
    (model,) = settings.models
    assert (model.name, model.model_id) == ("BAAI/bge-reranker-v2-m3", "BAAI/bge-reranker-v2-m3")
    assert (model.num_gpus, model.max_length, model.dtype, model.family) == (1.0, 512, "float16", "seq_cls")
    assert model.resolved_device == "cuda" and model.autoscales and settings.max_candidates == 200
    assert settings.default_model == "BAAI/bge-reranker-v2-m3"
    # Everything not given keeps the defaults of a model in `models`.
    plain = AppSettings.model_validate({"model_id": "BAAI/bge-reranker-v2-m3"})
    assert plain.models == [ModelSettings(model_id="BAAI/bge-reranker-v2-m3")]
    # A model field without model_id applies to the default model.
    assert AppSettings.model_validate({"num_replicas": "2"}).models[0].model_id == DEFAULT_MODEL_ID


@pytest.mark.parametrize("raw, fragment", [
    ({"model_id": "x/a", "models": [{"model_id": "x/b"}]}, "not both"),
    ({"model_id": "x/a", "num_gpus": "lots"}, "num_gpus"),
    ({"model_id": "x/a", "max_lenght": "512"}, "max_lenght"),  # a typo is still an error
])
def test_one_model_shorthand_rejects_bad_args(raw, fragment):
    with pytest.raises(ValidationError) as e:
        AppSettings.model_validate(raw)
    assert fragment in str(e.value)


def test_serve_run_key_value_args_build_the_one_model_app(no_fetch_check):
    """Ray's own `serve run` path: its CLI arg parsing, then its call of a pydantic-annotated builder."""
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve.scripts import convert_args_to_dict

    args = convert_args_to_dict(("model_id=BAAI/bge-reranker-v2-m3", "max_length=512", "num_gpus=0.5"))
    app = call_user_app_builder_with_args_if_necessary(build_app, args)
    settings, handles = app._bound_deployment.init_args
    assert list(handles) == ["BAAI/bge-reranker-v2-m3"] and settings.models[0].max_length == 512
    (handle,) = handles.values()
    assert handle._bound_deployment.ray_actor_options["num_gpus"] == 0.5
