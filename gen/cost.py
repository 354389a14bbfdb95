"""What a stage's API requests will cost, before sending them: the `--dry-run` estimate and the budget's per-chunk
worst case (prefloop/budget.py).

Prompt tokens are counted with the model's own tokenizer when one is on this machine (a model directory, or a hub
id in the Hugging Face cache), the way the server will see them (messages through the chat template); otherwise at
chars/4 of the prompt text (message contents), rounded up per prompt, and the estimate says so. One request per
prompt is assumed (a server that ignores `n` is topped up with more). Completion tokens are bounded by
`max_new_tokens` per completion; the openai backend samples one completion at temperature 0 and copies it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from prefloop.budget import Meter, Price, approx_tokens, load_prices, usd
from prefloop.gen import encode_prompt
from prefloop.records import chat_template_kwargs, load_prompts
from prefloop.runstate import read_summary
from prefloop.store import parse_shard, read_ids, shard_of

log = logging.getLogger(__name__)


def local_tokenizer(model: str) -> Any:
    """The model's tokenizer if its files are on this machine, else None (nothing is downloaded)."""
    path = Path(model)
    if not (path.is_dir() and (path / "tokenizer_config.json").is_file()):
        try:
            from huggingface_hub import try_to_load_from_cache

            if not isinstance(try_to_load_from_cache(model, "tokenizer_config.json"), str):
                return None
        except Exception:  # not a hub id (a server's own model name), or no hub library
            return None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(model, local_files_only=True)
    except Exception as e:
        log.info("no local tokenizer for %s (%s): counting prompt tokens at chars/4", model, type(e).__name__)
        return None


class TokenCounter:
    """Prompt tokens as `model`'s tokenizer counts them, else chars/4; `method` says which."""

    def __init__(self, model: str, chat: bool = False) -> None:
        self.model, self.chat = model, chat
        self.tokenizer = local_tokenizer(model)
        self.method = f"{model}'s tokenizer" if self.tokenizer is not None else (
            f"chars/4, rounded up per prompt: no local tokenizer for {model!r}")

    def count(self, prompt: Any, template_kwargs: dict | None = None) -> int:
        if self.tokenizer is None:
            return approx_tokens(prompt)
        if self.chat and isinstance(prompt, str):  # endpoint chat: the server wraps text as one user message
            prompt = [{"role": "user", "content": prompt}]
        try:
            return len(encode_prompt(self.tokenizer, prompt, self.model, template_kwargs))
        except Exception:  # e.g. messages for a tokenizer without a chat template: the server renders its own
            return approx_tokens(prompt)


def price_of(prices: Any, model: str) -> Price | None:
    return load_prices(prices).get(model)


def spent_on(config: Any, stage: str) -> float:
    """What `config.out` (earlier runs of it) and, in the loop, the run's other stages have spent: read only."""
    try:
        prior = read_summary(config.out).get("usage")
    except (OSError, ValueError):
        prior = None
    return Meter(stage, config.out, config.prices, spent_before=config.spent_before_usd, prior=prior).spent()


def cost_lines(price: Price | None, model: str, low: tuple[int, int], high: tuple[int, int], limit: float | None,
               spent: float) -> list[str]:
    """The estimate's cost and budget lines; `low` and `high` are (prompt, completion) tokens."""
    if price is None:
        return [f"  cost: no price for {model!r} (give --prices to estimate it)"]
    low, high = price.cost(*low), price.cost(*high)
    lines = [f"  cost: {usd(low)} to {usd(high)} at {model}'s prices ({usd(price.input_per_mtok)} input, "
             f"{usd(price.output_per_mtok)} output per million tokens)"]
    if limit is not None:
        left = f", {usd(spent)} spent so far" if spent else ""
        verdict = "fits" if spent + high <= limit else "may stop at the budget"
        lines.append(f"  budget: max_budget_usd {usd(limit)}{left}: the worst case {verdict}")
    return lines


def sampled_per_prompt(config: Any) -> int:
    """Completions the server generates per prompt: openai asks greedy prompts for one and copies it."""
    return 1 if config.backend == "openai" and config.temperature <= 0 else config.n


class PromptCosts:
    """Each generate prompt's worst-case cost: its tokens (counted once) and every completion at full length."""

    def __init__(self, config: Any) -> None:
        self.config = config
        self.counter = TokenCounter(config.model, chat=config.endpoint == "chat")
        self.price = price_of(config.prices, config.model)

    def tokens(self, prompt: dict) -> int:
        return self.counter.count(prompt["prompt"], chat_template_kwargs(prompt, self.config.chat_template_kwargs))

    def worst(self, chunk: list[dict]) -> float:
        if self.price is None:
            return 0.0
        completion = self.config.max_new_tokens * sampled_per_prompt(self.config)
        return sum(self.price.cost(self.tokens(p), completion) for p in chunk)


def dry_run(config: Any) -> str:
    """`prefloop generate --dry-run`: the estimate for the prompts not yet in `config.out`; nothing is sent or
    written (not even a lock file)."""
    loaded = load_prompts(config.prompts, config.prompt_field, config.id_field, config.chat)
    prompts = loaded.records
    shard = parse_shard(config.shard)
    if shard:
        prompts = [p for p in prompts if shard_of(p["id"], shard[1]) == shard[0]]
    try:
        done = read_ids(config.out)
    except Exception:  # an unreadable output is the real run's to report
        done = set()
    todo = [p for p in prompts if p["id"] not in done]
    costs = PromptCosts(config)
    prompt_tokens = sum(costs.tokens(p) for p in todo)
    k = sampled_per_prompt(config)
    completion = config.max_new_tokens * k * len(todo)
    greedy = " (temperature 0: one sampled, copied n times)" if k != config.n else ""
    lines = [
        f"prefloop generate --dry-run: nothing sent, nothing written. Model {config.model!r}, backend "
        f"{config.backend}.",
        f"  prompts: {len(todo)} to generate ({len(prompts) - len(todo)} already in {config.out}) x n={config.n}: "
        f"{len(todo)} requests, {len(todo) * config.n} completions",
        f"  prompt tokens: {prompt_tokens} ({costs.counter.method})",
        f"  completion tokens: at most {completion} (max_new_tokens {config.max_new_tokens} x {k} x {len(todo)} "
        f"prompts){greedy}",
    ]
    if config.backend != "openai":
        return "\n".join([*lines, f"  cost: none billed (backend {config.backend} runs locally)"])
    return "\n".join(lines + cost_lines(costs.price, config.model, (prompt_tokens, 0), (prompt_tokens, completion),
                                        config.max_budget_usd, spent_on(config, "generate")))
