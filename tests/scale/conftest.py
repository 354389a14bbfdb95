"""Fixtures for the scale-out tests: one tiny model and one local Ray cluster (2 CPUs) per module."""

from __future__ import annotations

from pathlib import Path

import pytest
from needs import need_module

from prefloop.tiny import save_tiny


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Path to a saved random tiny Llama + char-level tokenizer (the same builder as tests/gen's fixture)."""
    return save_tiny(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray cluster with 2 CPUs, shared by a test module (starting one costs ~5 s); yields its address.

    The stages find it already initialised and use it; a CLI subprocess connects to it with --ray-address.
    """
    ray = need_module("ray", "ray", "pip install 'prefloop[ray]'")
    need_module("ray", "ray.data", "pip install 'prefloop[ray]'")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()
