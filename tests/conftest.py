"""Shared test fixtures: the real datasets beside the repository (../shared/data) and tiny seeds."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    """../shared/data beside the checkout, or $MOEKIT_SHARED_DATA."""
    return Path(os.environ.get("MOEKIT_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture
def shared_data() -> Path:
    path = shared_data_dir()
    if not path.is_dir():
        pytest.skip(f"real datasets not found at {path} (set MOEKIT_SHARED_DATA)")
    return path
