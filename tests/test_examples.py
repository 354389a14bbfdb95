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


def test_instructions_grpo_example_is_the_measured_grpo_step_shape(tmp_path):
    """examples/demo/instructions_grpo.yaml over the instructions demo: the shape bench/README.md section 4 measured
    (4 prompts x 8 answers, one GRPO step of all 32 a round, tied prompts kept, one optimizer), the demo's other
    settings kept."""
    from prefloop.demo.instructions import INSTRUCTIONS, instructions_config

    config = instructions_config(str(tmp_path), config_file=str(ROOT / "examples" / "demo" / "instructions_grpo.yaml"),
                                 model="model-dir")
    assert (config.prompts_per_round, config.gen["n"], config.export) == (4, 8, {"keep_equal_rewards": True})
    assert {k: config.train[k] for k in ("method", "beta", "batch_size", "lr_schedule", "carry_optimizer")} == {
        "method": "grpo", "beta": 0, "batch_size": 4, "lr_schedule": "constant", "carry_optimizer": True}
    assert config.gen["temperature"] == INSTRUCTIONS["gen"]["temperature"] and config.judge == INSTRUCTIONS["judge"]
