"""Tests never download: in-process data loading sees every host as unreachable (data.download=auto stays off)."""

import pytest

from ssl.data import datasets


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datasets, "host_reachable", lambda url: False)
