"""What a test needs that a machine may lack (vLLM, Ray, `transformers serve`, the packaged real model): skipped
where it is missing, a failure where the run requires it.

CI sets `PREFLOOP_REQUIRE=all` (.ci/run, the README's test command): there a broken or missing install fails the
run instead of passing it silently with skips. `PREFLOOP_REQUIRE=vllm,ray` requires just those;
`PREFLOOP_REQUIRE_VLLM=1` (the older spelling) still requires vLLM.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import NoReturn

import pytest

KINDS = ("vllm", "ray", "serve", "model")


def required(kind: str) -> bool:
    assert kind in KINDS, kind
    wanted = {k.strip() for k in os.environ.get("PREFLOOP_REQUIRE", "").split(",") if k.strip()}
    if kind == "vllm" and os.environ.get("PREFLOOP_REQUIRE_VLLM") == "1":
        return True
    return kind in wanted or "all" in wanted


def missing(kind: str, message: str) -> NoReturn:
    """Skip the test, or fail it when `kind` is required here."""
    if required(kind):
        pytest.fail(f"PREFLOOP_REQUIRE includes {kind}: {message}", pytrace=False)
    pytest.skip(message)


def need_module(kind: str, name: str, fix: str) -> ModuleType:
    """Import `name` for a test, or skip/fail naming the install fix."""
    try:
        return importlib.import_module(name)
    except Exception as e:  # an install that is there but broken (e.g. a wheel for another torch) counts too
        missing(kind, f"{name} does not import ({type(e).__name__}: {e}). Fix: {fix}")
