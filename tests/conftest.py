"""Fixtures shared by the test modules."""

import urllib.error
import urllib.request

import pytest
import torch


@pytest.fixture
def float64():
    """Compare in float64 (the other test modules keep the default type)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


@pytest.fixture
def isolated_env(tmp_path, monkeypatch):
    """Keep a test away from the user's cache and data settings."""
    monkeypatch.setenv("LCBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("LCBENCH_DATA", raising=False)
    monkeypatch.delenv("LCBENCH_SYSTEM_DATA", raising=False)


@pytest.fixture
def offline(monkeypatch):
    """Make every urllib request fail as it does without a network; returns the attempted URLs."""
    attempts = []

    def refuse(request, *args, **kwargs):
        attempts.append(getattr(request, "full_url", request))
        raise urllib.error.URLError("network unreachable")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    return attempts
