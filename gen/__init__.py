"""Generators: sample N candidate responses per prompt.

A backend is any object with the `Generator` protocol; `load_generator` picks one by name. Backends import their
heavy dependencies lazily, so `import prefloop.gen` stays cheap.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from prefloop.records import Completion, Prompt


@dataclass
class Sampling:
    """Sampling settings shared by every backend. `temperature == 0` means greedy, as in vLLM and OpenAI."""

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    stop: list[str] = field(default_factory=list)


class Generator(Protocol):
    """Turns prompts into `n` completions each. `name` identifies the model (and adapter) in records."""

    name: str

    def generate(self, prompts: list[Prompt], n: int, sampling: Sampling) -> list[list[Completion] | None]:
        """One list of `n` completions per prompt, in order; `None` marks a prompt that failed (retried on resume)."""
        ...

    def close(self) -> None: ...


BACKENDS = ("hf",)


def load_generator(backend: str, model: str, adapter: str | None = None, **options) -> Generator:
    """Construct the named backend. Options are backend-specific (e.g. `batch_size`, `dtype` for hf)."""
    if backend == "hf":
        from prefloop.gen.hf import HFGenerator

        return HFGenerator(model, adapter=adapter, **options)
    raise ValueError(f"unknown generation backend {backend!r}; choose one of: {', '.join(BACKENDS)}")
