"""examples/: each loop file parses as the `run` command reads it, and loop.yaml (which the README shows verbatim)
holds the addition demo's measured settings, not older ones."""

from __future__ import annotations

from pathlib import Path

import pytest

from prefloop.config import from_dict, load_yaml
from prefloop.demo.addition import DEMO
from prefloop.loop import LoopConfig

ROOT = Path(__file__).parent.parent
LOOPS = ["loop.yaml", "self_rewarding.yaml"]


@pytest.mark.parametrize("name", LOOPS)
def test_loop_example_parses_as_a_loop_config(name):
    path = ROOT / "examples" / name
    config = from_dict(LoopConfig, load_yaml(path), str(path))
    assert config.rounds >= 1 and config.out


def test_readme_shows_loop_yaml_verbatim():
    assert (ROOT / "examples" / "loop.yaml").read_text() in (ROOT / "README.md").read_text()


def test_loop_yaml_has_the_demo_settings_that_change_results():
    """Every method setting the example names is the demo's (prefloop/demo/addition.py records how each was
    measured); speed-only and output settings (batch sizes of generation, dtype, logging) may be left out."""
    example = load_yaml(ROOT / "examples" / "loop.yaml")
    for key in ("rounds", "prompts_per_round", "init", "data", "reference"):
        assert example[key] == DEMO[key], key
    for stage in ("gen", "judge", "pairs", "train"):
        for key, value in example[stage].items():
            assert DEMO[stage][key] == value, f"{stage}.{key}"
    for key in ("lr", "batch_size", "epochs", "loss", "beta"):  # the ones the demo's comments say were measured
        assert example["train"][key] == DEMO["train"][key], key
