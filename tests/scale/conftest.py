"""Fixtures for the scale-out tests: one tiny model and one local Ray cluster (2 CPUs) per module."""

from __future__ import annotations

import pytest
from needs import need_module


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
