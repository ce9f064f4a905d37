"""Shared offline fixtures: tiny synthetic data, a tiny encoder, TRM and LM (caches are isolated by ../conftest.py)."""

import pytest

from deeprec_env.fixtures import build_tiny_encoder, build_tiny_lm, tiny_dataset, tiny_env_kwargs


@pytest.fixture(scope="session")
def tiny_ds():
    return tiny_dataset()


@pytest.fixture(scope="session")
def tiny_encoder_path(tmp_path_factory):
    return build_tiny_encoder(tmp_path_factory.mktemp("tiny_encoder"))


@pytest.fixture(scope="session")
def tiny_encoder(tiny_encoder_path):
    from deeprec_env.embed import TextEncoder

    return TextEncoder(tiny_encoder_path)


@pytest.fixture(scope="session")
def env_kwargs(tiny_encoder_path):
    """Keyword arguments for a fast DeepRec env on synthetic data with a tiny encoder and TRM."""
    return tiny_env_kwargs(tiny_encoder_path)


@pytest.fixture(scope="session")
def resources(env_kwargs, tmp_path_factory):
    import os

    from deeprec_env.env import EnvConfig, get_resources

    old = os.environ.get("DEEPREC_CACHE")
    os.environ["DEEPREC_CACHE"] = str(tmp_path_factory.mktemp("res_cache"))
    try:
        return get_resources(EnvConfig(**env_kwargs), progress=False)
    finally:
        if old is None:
            del os.environ["DEEPREC_CACHE"]
        else:
            os.environ["DEEPREC_CACHE"] = old


@pytest.fixture
def make_env(env_kwargs, resources):
    from deeprec_env.env import DeepRecEnv

    def make(**overrides):
        return DeepRecEnv(resources=resources, **{**env_kwargs, **overrides})

    return make


@pytest.fixture(scope="session")
def tiny_lm_path(tmp_path_factory):
    return build_tiny_lm(tmp_path_factory.mktemp("tiny_lm"))


@pytest.fixture
def fake_vllm(monkeypatch):
    """Install the vLLM stand-in (tests/fake_vllm.py) as ``vllm``; yields the module (its ``ENGINES``)."""
    import os
    import sys

    from tests import fake_vllm as module

    module.ENGINES.clear()
    monkeypatch.setitem(sys.modules, "vllm", module)
    had = "VLLM_ENABLE_V1_MULTIPROCESSING" in os.environ
    yield module
    if not had:
        os.environ.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
