"""Fixtures for every test, the doctests in the package included: offline, caches in a temporary folder."""

import pytest


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Every test writes its caches under a temporary folder, never the user's home."""
    monkeypatch.setenv("DEEPREC_CACHE", str(tmp_path_factory.mktemp("cache")))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
