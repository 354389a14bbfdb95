"""Where a stage's work runs (`--engine`): the engine options' checks, and executors found by name.

The stages keep a registry of their executors as "module:class" strings (gen/executor.py `EXECUTORS`,
judge/stage.py `JUDGE_EXECUTORS`) and load one here when it runs, so no stage imports an engine: the Ray engines
(prefloop/ray_engine.py, prefloop/ray_llm.py) sit above the stages and import them, never the other way round.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

from prefloop.config import ConfigError

RAY_ENGINES = ("ray", "ray-llm")  # engines that need Ray Data (ray-llm also vLLM: prefloop/ray_llm.py)


def load_executor(registry: dict[str, str], name: str) -> type:
    """The class registered under `name` ("module:class"), imported now."""
    module, _, attr = registry[name].partition(":")
    return getattr(importlib.import_module(module), attr)


def check_engine(config: Any, engines: tuple[str, ...]) -> None:
    """`__post_init__` checks of the engine options GenerateConfig and JudgeConfig share (fail before any work)."""
    if config.engine not in engines:
        hint = " (ray-llm generates only; judges run on --engine ray)" if config.engine == "ray-llm" else ""
        raise ConfigError(f"engine = {config.engine!r}. Fix: use one of {', '.join(engines)}{hint}.")
    if config.ray_actors < 1 or config.ray_batch_size < 1:
        raise ConfigError("ray_actors and ray_batch_size must be >= 1.")
    if config.ray_num_cpus <= 0 or config.ray_num_gpus < 0:
        raise ConfigError("ray_num_cpus must be > 0 and ray_num_gpus >= 0.")
    if config.engine in RAY_ENGINES and importlib.util.find_spec("ray") is None:
        raise ConfigError(
            f"--engine {config.engine} needs Ray Data. Fix: pip install 'prefloop[ray]', or use --engine local."
        )
