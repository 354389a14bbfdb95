"""Fixtures for generator tests: a tiny random Llama saved once per session (no downloads)."""

from __future__ import annotations

from pathlib import Path

import pytest

from prefloop.tiny import save_tiny


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Path to a saved random tiny Llama + char-level tokenizer with a chat template (context: 128 tokens)."""
    return save_tiny(tmp_path_factory.mktemp("tiny") / "model")
