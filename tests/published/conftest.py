"""Fixtures of the published-format tests."""

from __future__ import annotations

import pytest

from tests.published.edm2_pickles import install_edm2_names


@pytest.fixture
def edm2_names(monkeypatch: pytest.MonkeyPatch) -> None:
    """edm2's module names, importable while pickling (tests/published/edm2_pickles.py)."""
    install_edm2_names(monkeypatch)
