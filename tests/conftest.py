"""Shared offline fixtures: tiny synthetic data, an isolated cache folder."""

import pytest

from deeprec_env.data import synthetic


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Every test writes its caches under a temporary folder, never the user's home."""
    monkeypatch.setenv("DEEPREC_CACHE", str(tmp_path_factory.mktemp("cache")))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_ds():
    return synthetic(n_users=60, n_items=40, seed=0)
