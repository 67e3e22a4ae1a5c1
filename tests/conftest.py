"""Shared fixtures: every test runs in its own folder with its own MLflow store."""

from __future__ import annotations

import pytest


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """Run in a fresh folder with MLflow pointed at a SQLite file inside it."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    return tmp_path


@pytest.fixture(scope="session", autouse=True)
def _private_model_cache(tmp_path_factory):
    """Build the tiny VLM into a per-session folder, never into the user's ~/.cache."""
    import os

    folder = tmp_path_factory.mktemp("covr-cache")
    previous = os.environ.get("COVR_LIGHTNING_CACHE")
    os.environ["COVR_LIGHTNING_CACHE"] = str(folder)  # inherited by subprocess CLI tests
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the hub
    yield folder
    if previous is None:
        os.environ.pop("COVR_LIGHTNING_CACHE", None)
    else:
        os.environ["COVR_LIGHTNING_CACHE"] = previous
