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
