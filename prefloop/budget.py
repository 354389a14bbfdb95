"""API spend: tokens counted from a server's `usage`, priced from the user's price table, and a budget that stops a
stage cleanly.

    # prices.yaml: USD per million tokens, per model name as the stage names it (--model, --judge-model)
    gpt-4o-mini: {input_per_mtok: 0.15, output_per_mtok: 0.60}

prefloop ships no prices: they change, and a stale built-in number would make a budget lie.

Counting. Every reply of the openai backend adds its `usage.prompt_tokens` and `usage.completion_tokens` to its
generator's `Usage`. A reply without them is counted as far as it is known (completion tokens of choices that carry
their own count, none of its prompt) and the count is marked `partial`; the budget then charges that reply its worst
case (its prompt at chars/4, every choice `max_tokens` long), so a server that omits usage cannot overrun a budget
unseen. A request abandoned at its timeout is not counted (the server may still bill it).

Spending. A stage's `Meter` adds its generators' usage to what earlier runs of the same output spent (kept in the
stage summary, so a resumed run counts on) and, in the loop, to what the run's other stages spent. With
`max_budget_usd` the stage checks before each chunk that spent + the chunk's worst case (every completion
`max_new_tokens` long) stays within the budget, and the generator checks before each request that the spend has not
passed it (retries, top-ups and parse retries are not in the chunk's estimate). Either stop persists what finished
and raises `BudgetExceeded`, exit 2; re-running with a higher budget resumes.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from prefloop.config import ConfigError
from prefloop.errors import BudgetExceeded, PrefloopError

PRICE_KEYS = ("input_per_mtok", "output_per_mtok")
CHARS_PER_TOKEN = 4  # the approximation when no tokenizer is at hand: about right for English BPE vocabularies
# What a stage's summary keeps per model (`usage.models`); the last three only for replies without usage.
COUNTS = ("prompt_tokens", "completion_tokens", "requests", "requests_without_usage", "unreported_prompt_tokens_max",
          "unreported_completion_tokens_max")
PRICE_FIX = "give each model as `NAME: {input_per_mtok: USD, output_per_mtok: USD}` (USD per million tokens)"


@dataclass(frozen=True)
class Price:
    """USD per million input (prompt) and output (completion) tokens."""

    input_per_mtok: float
    output_per_mtok: float

    def cost(self, prompt_tokens: float, completion_tokens: float) -> float:
        return (prompt_tokens * self.input_per_mtok + completion_tokens * self.output_per_mtok) / 1e6


def load_prices(value: Any) -> dict[str, Price]:
    """The price table from `--prices`: a YAML/JSON file, an inline mapping (YAML text or a dict), or None."""
    if value is None or value == {}:
        return {}
    source = "--prices"
    if isinstance(value, str) and not value.lstrip().startswith("{") and "\n" not in value:
        path = Path(value)
        if not path.is_file():
            raise ConfigError(f"{value}: prices file not found. Fix: check the --prices path, or give the table "
                              "inline, e.g. --prices '{MODEL: {input_per_mtok: 0.15, output_per_mtok: 0.6}}'.")
        source, value = str(path), path.read_text(encoding="utf-8")
    if isinstance(value, str):
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f":{mark.line + 1}" if mark and source != "--prices" else ""
            raise ConfigError(f"{source}{where}: invalid YAML ({getattr(e, 'problem', e)}). Fix: {PRICE_FIX}.") from None
    if not isinstance(value, dict) or not value:
        raise ConfigError(f"{source}: expected a mapping of model names to prices. Fix: {PRICE_FIX}.")
    prices = {}
    for model, entry in value.items():
        where = f"{source}: model {str(model)!r}"
        if not isinstance(entry, dict) or set(entry) != set(PRICE_KEYS):
            got = ", ".join(map(str, entry)) if isinstance(entry, dict) else type(entry).__name__
            raise ConfigError(f"{where}: needs exactly {' and '.join(PRICE_KEYS)} (got {got or 'nothing'}). "
                              f"Fix: {PRICE_FIX}.")
        numbers = []
        for key in PRICE_KEYS:
            x = entry[key]
            if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or x < 0:
                raise ConfigError(f"{where}: {key} = {x!r} is not a price. Fix: a number of USD >= 0 per million "
                                  "tokens, e.g. 0.15.")
            numbers.append(float(x))
        prices[str(model)] = Price(*numbers)
    return prices


def check_budget(limit: float | None, prices: Any, models: list[str], api: bool, stage: str) -> None:
    """Refuse, before any work, a budget that cannot be kept: negative, on a stage with no API spend, or over a
    model without a price. Also parses `prices`, so a malformed table fails now with or without a budget."""
    table = load_prices(prices)
    if limit is None:
        return
    if isinstance(limit, bool) or not math.isfinite(limit) or limit < 0:
        raise ConfigError(f"max_budget_usd = {limit!r}: a budget is USD >= 0. Fix: e.g. --max-budget-usd 5.")
    if not api:
        raise ConfigError(f"{stage}: max_budget_usd limits what an API server bills, and nothing here sends API "
                          "requests. Fix: drop --max-budget-usd, or use the openai backend.")
    for model in models:
        if model not in table:
            raise ConfigError(f"{stage}: no price for model {model!r}, which --max-budget-usd needs. Fix: add "
                              f"`{model}: {{input_per_mtok: USD, output_per_mtok: USD}}` to --prices.")


def approx_tokens(prompt: Any) -> int:
    """A prompt's tokens at chars/4, rounded up: its text, or its messages' contents."""
    text = prompt if isinstance(prompt, str) else "".join(str(m.get("content") or "") for m in prompt)
    return math.ceil(len(text) / CHARS_PER_TOKEN)


def usd(x: float) -> str:
    """Dollars to about four significant digits (cents from $100 up): $0.000014, $0.0425, $12.35, $1,234.50."""
    if x >= 100:
        return f"${x:,.2f}"
    if x <= 0:
        return "$0"
    text = f"{x:.{max(2, 3 - math.floor(math.log10(x)))}f}"
    return "$" + (text.rstrip("0").rstrip(".") if "." in text else text)


class Usage:
    """One generator's token counts, from its replies' `usage` (see module docstring)."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.counts = dict.fromkeys(COUNTS, 0)

    def add(self, usage: Any, completions: list[dict[str, Any]], prompt: Any, max_tokens: int) -> None:
        """Count one reply: its `usage` object (or None), its parsed completions, the prompt and max_tokens sent."""
        c = self.counts
        c["requests"] += 1
        prompt_tokens = _count(getattr(usage, "prompt_tokens", None))
        completion_tokens = _count(getattr(usage, "completion_tokens", None))
        if prompt_tokens is not None and completion_tokens is not None:
            c["prompt_tokens"] += prompt_tokens
            c["completion_tokens"] += completion_tokens
            return
        c["requests_without_usage"] += 1
        if prompt_tokens is not None:
            c["prompt_tokens"] += prompt_tokens
        else:
            c["unreported_prompt_tokens_max"] += approx_tokens(prompt)
        if completion_tokens is not None:
            c["completion_tokens"] += completion_tokens
        else:
            known = [x.get("num_tokens") for x in completions]
            c["completion_tokens"] += sum(k or 0 for k in known)
            c["unreported_completion_tokens_max"] += sum(max_tokens for k in known if k is None)


def _count(x: Any) -> int | None:
    return int(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and x >= 0 else None


def merge_counts(*by_model: dict[str, dict[str, Any]]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for table in by_model:
        for model, counts in (table or {}).items():
            mine = out.setdefault(model, dict.fromkeys(COUNTS, 0))
            for key in COUNTS:
                mine[key] += int(counts.get(key) or 0)
    return out


def summarize(by_model: dict[str, dict[str, int]], prices: dict[str, Price]) -> dict[str, Any]:
    """The `usage` a summary or manifest shows: totals, cost_usd when every model has a price, and per model."""
    total = merge_counts(*({"": c} for c in by_model.values())).get("", dict.fromkeys(COUNTS, 0))
    out: dict[str, Any] = {k: total[k] for k in ("prompt_tokens", "completion_tokens", "requests")}
    out["partial"] = total["requests_without_usage"] > 0
    if out["partial"]:
        out["requests_without_usage"] = total["requests_without_usage"]
    priced = [m for m in by_model if m in prices]
    if priced and len(priced) == len(by_model):
        out["cost_usd"] = round(sum(prices[m].cost(c["prompt_tokens"], c["completion_tokens"])
                                    for m, c in by_model.items()), 8)
        if out["partial"]:
            out["cost_usd_max"] = round(upper_cost(by_model, prices), 8)
    out["models"] = {m: {k: v for k, v in c.items() if v or k in COUNTS[:3]} for m, c in by_model.items()}
    return out


def upper_cost(by_model: dict[str, dict[str, Any]], prices: dict[str, Price]) -> float:
    """What the counts cost at most: unreported tokens charged their worst case; unpriced models count 0."""
    return sum(prices[m].cost(c.get("prompt_tokens", 0) + c.get("unreported_prompt_tokens_max", 0),
                              c.get("completion_tokens", 0) + c.get("unreported_completion_tokens_max", 0))
               for m, c in by_model.items() if m in prices)


def _models(summary: Path) -> dict[str, Any]:
    with contextlib.suppress(OSError, ValueError, AttributeError):
        return json.loads(summary.read_text(encoding="utf-8")).get("usage", {}).get("models") or {}
    return {}


def spent_in(summaries: list[Path], prices: dict[str, Price]) -> tuple[dict[str, dict[str, int]], float]:
    """(counts per model, their cost at most) over stage summaries: what a loop run has spent so far."""
    counts = merge_counts(*(_models(p) for p in summaries))
    return counts, upper_cost(counts, prices)


def summary_files(run_dir: str | Path) -> list[Path]:
    """Every stage summary of a loop run (ensemble members' too): where its API spend is recorded."""
    return sorted(Path(run_dir).glob("round_*/**/*.summary.json"))


def in_run(values: dict[str, Any], prices: Any, limit: float | None, run_dir: str | Path) -> dict[str, Any]:
    """A loop's API stage settings (`values`, with its `out`) given the loop's prices and budget, and what the run's
    other stages spent: one budget for the whole run, resumed from the summaries on disk."""
    values = {"prices": prices, **values}
    if limit is not None:
        out = Path(values["out"])
        own = out.with_name(f"{out.stem}.summary.json").resolve()
        others = [p for p in summary_files(run_dir) if p.resolve() != own]
        values.update(max_budget_usd=limit, spent_before_usd=spent_in(others, load_prices(prices))[1])
    return values


def usage_of(outputs: list[Path], prices: Any) -> dict[str, Any]:
    """`{"usage": ...}` over stage outputs' summaries (a loop phase of several stages), or {} when none has any."""
    counts = merge_counts(*(_models(p.with_name(f"{p.stem}.summary.json")) for p in outputs))
    return {"usage": summarize(counts, load_prices(prices))} if counts else {}


class Meter:
    """A stage's spend and budget: earlier runs' counts (`prior`, its summary's `usage`), its generators' live
    counts, and `spent_before` (the loop's other stages). `limit` None: count only, never stop."""

    def __init__(self, stage: str, out: str | Path, prices: Any = None, limit: float | None = None,
                 spent_before: float = 0.0, prior: dict[str, Any] | None = None) -> None:
        self.stage, self.out, self.limit, self.spent_before = stage, Path(out), limit, spent_before
        self.prices = load_prices(prices)
        self.prior = (prior or {}).get("models") or {}
        self.sources: list[Usage] = []

    def watch(self, obj: Any) -> None:
        """Count the requests of `obj`: a generator with `usage` (the openai backend), or a judge holding one (its
        `generator`, its `verifier`'s). The generator also gets this meter as its `budget` (checked per request)."""
        if obj is None:
            return
        usage = getattr(obj, "usage", None)
        if isinstance(usage, Usage):
            if all(u is not usage for u in self.sources):
                self.sources.append(usage)
            if self.limit is not None:
                obj.budget = self
        for attr in ("generator", "verifier"):
            if hasattr(obj, attr):
                self.watch(getattr(obj, attr))

    @property
    def active(self) -> bool:
        return bool(self.sources or self.prior)

    def counts(self) -> dict[str, dict[str, int]]:
        return merge_counts(self.prior, *({u.model: u.counts} for u in self.sources))

    def summary(self) -> dict[str, Any]:
        """`{"usage": ...}` for the stage summary; empty for a stage that made no API request, ever."""
        return {"usage": summarize(self.counts(), self.prices)} if self.active else {}

    def spent(self) -> float:
        return self.spent_before + upper_cost(self.counts(), self.prices)

    def over(self) -> bool:
        return self.limit is not None and self.spent() > self.limit

    def exceeded(self) -> str | None:
        """Why no further request may be sent, or None: the generator's per-request check."""
        return f"the budget is spent ({usd(self.spent())} of {usd(self.limit)})" if self.over() else None

    def before_chunk(self, cost: float, prompts: int) -> None:
        """Raise `BudgetExceeded` if this chunk, at `cost` USD in the worst case (every completion at full length),
        could take the spend past the budget."""
        if self.limit is not None and self.spent() + cost > self.limit:
            raise self.error(f"the next chunk ({prompts} rows) may cost up to {usd(cost)}", chunk=True)

    def check(self) -> None:
        """Raise `BudgetExceeded` if the spend has passed the budget. (A spend past it after a stage's last chunk
        does not stop that stage, whose work is done: the next chunk, or the loop's next API stage, stops.)"""
        if self.over():
            raise self.error("")

    def error(self, why: str, chunk: bool = False) -> BudgetExceeded:
        elsewhere = f", {usd(self.spent_before)} of it by the run's other stages," if self.spent_before else ""
        why = f"; {why}" if why else ""
        finer = "; a lower --chunk-size stops in finer steps" if chunk else ""
        return BudgetExceeded(
            f"{self.stage}: budget reached: {usd(self.spent())} spent{elsewhere} of max_budget_usd "
            f"{usd(self.limit)}{why}. Everything finished is kept in {self.out}. Fix: raise --max-budget-usd (or "
            f"max_budget_usd in a config) and re-run the same command: it resumes{finer}.")

    @contextlib.contextmanager
    def enforce(self, on_stop: Callable[[], Any]) -> Iterator[None]:
        """Turn a stop into `BudgetExceeded` after `on_stop()` (which writes the summary): a budget check's own, or
        a generator's fatal error raised because the budget halted it."""
        try:
            yield
        except BudgetExceeded:
            on_stop()
            raise
        except PrefloopError:
            if not self.over():
                raise
            on_stop()
            raise self.error("") from None
