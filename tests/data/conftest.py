"""Fixtures for the data tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from .helpers import good_split


@pytest.fixture
def raw_dir(tmp_path: Path) -> Path:
    good_split(tmp_path / "raw")
    return tmp_path / "raw"
