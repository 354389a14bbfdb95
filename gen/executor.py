"""What the generate stage's driver (gen/stage.py) asks of an executor, and what every executor shares.

An executor turns pending prompts into finished batches; the driver alone opens the store, skips the ids already on
disk, writes, counts, shows progress, applies the failure ceiling and the budget, and writes the summary. So every
engine writes the same records with the same guarantees, and a run started on one resumes on another.

    local    gen/stage.py:LocalGenerate        this process's Generator, one call per chunk_size prompts
    ray      prefloop/ray_engine.py:RayGenerate Ray Data actors, each running prefloop's Generator
    ray-llm  prefloop/ray_llm.py:RayLLMGenerate Ray's own vLLM processor (ray.data.llm)

Executors are registered by name (`EXECUTORS`, "module:class"), so the stage never imports an engine: adding one
is a module with a class like those plus one line here.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from prefloop.engine import load_executor
from prefloop.gen import GenerationAborted, encode_prompt
from prefloop.records import LoadedPrompts, chat_template_kwargs
from prefloop.store import InputError

log = logging.getLogger(__name__)

EXECUTORS = {
    "local": "prefloop.gen.stage:LocalGenerate",
    "ray": "prefloop.ray_engine:RayGenerate",
    "ray-llm": "prefloop.ray_llm:RayLLMGenerate",
}


@dataclass
class Finished:
    """One batch of work an executor finished, for the driver to write and count.

    `rows`: (prompt, its completions, or None when the backend failed it: not written, so a re-run retries it).
    `too_long`: (prompt, its length in tokens, the context) found by an executor that checks per batch; without
    `skip_too_long` the driver writes the batch's rows, then stops the stage naming the first.
    `aborted`: a fatal backend error's message (an exhausted quota): the rows are written, then the stage stops.
    `halted`: the budget stopped the generator, so the prompts it did not send are not failures.
    """

    rows: list[tuple[dict, list | None]]
    model: str
    tokens: int = 0
    too_long: list[tuple[dict, int, int]] = field(default_factory=list)
    aborted: str | None = None
    halted: bool = False


class Executor(Protocol):
    """Built as `cls(config, loaded, meter)`; `check(config)` runs in `GenerateConfig.__post_init__`."""

    def start(self, todo: list[dict]) -> tuple[list[dict], list[str]]:
        """Load what the work needs; return (the prompts left, the ids skipped as too long). A too-long prompt
        without `skip_too_long` raises `InputError` here, before any generation, where the executor can tell."""

    def batches(self, todo: list[dict]) -> Iterator[Finished]: ...

    def summary(self) -> dict[str, Any]:
        """Where the work ran (`engine`, and the engine's own details), for the stage summary."""

    def close(self) -> None: ...


def executor_class(engine: str) -> type:
    """The executor registered for `engine` (an unknown name is refused by `check_engine` before this)."""
    return load_executor(EXECUTORS, engine)


def prompt_seed(seed: int, prompt_id: str) -> int:
    """A prompt's seed (its k-th sample uses it + k) depends on its id, not its position or batch, so a resumed run
    samples what a straight run did (tests/reliability/test_kill.py compares the completions)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{prompt_id}".encode()).digest()[:4], "big") & 0x7FFFFFFF


def candidate(prompt: dict, completions: list, model_name: str, config: Any, chash: str) -> dict:
    """The candidates record (docs/architecture.md, "Records"), the same from every executor."""
    columns = {k: v for k, v in prompt.items() if k not in ("id", "prompt")}
    record = {
        "id": prompt["id"],
        "prompt": prompt["prompt"],
        "completions": completions,
        "model": model_name,
        "round": config.round,
        "config_hash": chash,
        "columns": columns,
    }
    template_kwargs = chat_template_kwargs(prompt, config.chat_template_kwargs)
    if template_kwargs:  # what the prompt was rendered with; the judge passes it on, the pairs give it to TRL
        record["chat_template_kwargs"] = template_kwargs
    return record


def encode_all(tokenizer, prompts: list[dict], name: str, loaded: LoadedPrompts,
               template_kwargs: dict | None = None) -> Iterator[tuple[dict, list[int]]]:
    """(prompt, its token ids) as every local backend encodes it (`template_kwargs`: the stage's
    `chat_template_kwargs`, merged with each row's `tools`); a prompt that cannot be encoded (e.g. messages for a
    tokenizer without a chat template) stops the stage, naming its file:line."""
    for p in prompts:
        try:
            yield p, encode_prompt(tokenizer, p["prompt"], name, chat_template_kwargs(p, template_kwargs))
        except ValueError as e:
            raise InputError(f"{loaded.locations.get(p['id'], p['id'])}: {e}") from None


def drop_too_long(too_long: list[tuple[dict, int]], todo: list[dict], config: Any, context: int | None,
                  loaded: LoadedPrompts) -> tuple[list[dict], list[str]]:
    """(prompts left, ids skipped): refuse the stage over a too-long prompt, or with skip_too_long drop them."""
    if too_long and not config.skip_too_long:
        raise InputError(too_long_message([(p, n, context) for p, n in too_long], config, loaded))
    skipped = [p["id"] for p, _ in too_long]
    if not skipped:
        return todo, []
    log.warning("generate: skipped %d prompts too long for the context (skip_too_long), e.g. %s", len(skipped),
                ", ".join(map(repr, skipped[:5])))
    skip = set(skipped)
    return [p for p in todo if p["id"] not in skip], skipped


def too_long_message(too_long: list[tuple[dict, int, int]], config: Any, loaded: LoadedPrompts,
                     kept: int | None = None) -> str:
    """The one line for prompts too long for the context: before any generation (`kept` None), or once `kept`
    prompts are on disk (an executor that finds them per batch)."""
    (first, length, context), more = too_long[0], len(too_long) - 1
    where = loaded.locations.get(first["id"], config.prompts)
    others = f" ({more} more prompt{'s' * (more > 1)} too long as well)" if more else ""
    done = "Nothing was generated." if kept is None else f"The {kept} prompts finished before it are kept."
    return (
        f"{where}: prompt {first['id']!r} is {length} tokens long, but the model's context of {context} tokens with "
        f"max_new_tokens={config.max_new_tokens} fits prompts of at most {max(context - config.max_new_tokens, 0)} "
        f"tokens{others}. {done} Fix: shorten or drop it, lower --max-new-tokens, or pass --skip-too-long to skip "
        "such prompts (counted in the summary as `skipped_too_long`)."
    )


def check_failed_ceiling(failed: int, total: int, config: Any, out: Path) -> None:
    """More than `max_failed_fraction` of the prompts failed: stop the stage (records on disk are kept)."""
    if failed > config.max_failed_fraction * total:
        raise GenerationAborted(
            f"generate: {failed} of {total} prompts failed, over the ceiling "
            f"max_failed_fraction={config.max_failed_fraction}. Records so far are kept in {out}; "
            "fix the cause and re-run the same command to resume.",
            [],
        )
