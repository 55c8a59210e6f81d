"""Shared fixtures for the unit tests."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def write_profile(tmp_path: Path):
    """Write a YAML profile into tmp_path and return its path."""

    def write(text: str, name: str = "p.yaml") -> Path:
        path = tmp_path / name
        path.write_text(text)
        return path

    return write
