"""What an llm judge's API requests will cost, before sending them: the `--dry-run` estimate and the budget's
per-chunk worst case (prefloop/budget.py). Prompt tokens are counted as in gen/cost.py.

Per candidates row, the requests of a first attempt are known in advance: pointwise, one per completion (its
instruction rendered exactly); pairwise, two per knockout match (both orders), N-1 matches for N distinct non-empty
answers, each bounded by the instruction holding the row's two longest answers. Parse retries (up to
`parse_retries` more per request) happen only for answers without a verdict: they are the estimate's high end, and
the budget's per-request check covers them. Cache hits cost nothing and are not subtracted. A constitutional
judge's chain depends on its own answers, so it has no estimate: its budget is checked per request only.
"""

from __future__ import annotations

from typing import Any

from prefloop.gen.cost import TokenCounter, cost_lines, price_of, spent_on
from prefloop.judge import uses_generator
from prefloop.judge.templates import messages, render
from prefloop.judge.tournament import entrants
from prefloop.store import read_ids


class JudgeCosts:
    """An llm judge's first-attempt requests per row, as (judge input, how many requests like it)."""

    def __init__(self, config: Any) -> None:
        self.config = config
        self.template = config.load_template()
        self.counter = TokenCounter(config.judge_model)
        self.price = price_of(config.prices, config.judge_model)

    def _input(self, text: str) -> Any:  # as LLMJudge sends it
        if self.config.judge_chat:
            return messages(self.template, text)
        return (self.template.system + "\n\n" if self.template.system else "") + text

    def requests(self, row: dict[str, Any]) -> list[tuple[Any, int]]:
        comps, prompt = row["completions"], row["prompt"]
        if self.template.mode == "pointwise":
            return [(self._input(render(self.template, prompt, [c["text"]])), 1) for c in comps]
        players = entrants(comps)
        if len(players) < 2:
            return []
        a, b = sorted((comps[i]["text"] for i in players), key=len, reverse=True)[:2]
        matches = len(players) - 1
        return [(self._input(render(self.template, prompt, [a, b])), matches),
                (self._input(render(self.template, prompt, [b, a])), matches)]

    def tally(self, rows: list[dict[str, Any]]) -> tuple[int, int]:
        """(requests, prompt tokens) of the rows' first attempts."""
        requests = tokens = 0
        for row in rows:
            for judge_input, count in self.requests(row):
                requests += count
                tokens += count * self.counter.count(judge_input)
        return requests, tokens

    def worst(self, rows: list[dict[str, Any]]) -> float:
        if self.price is None:
            return 0.0
        requests, tokens = self.tally(rows)
        return self.price.cost(tokens, requests * self.config.judge_max_new_tokens)


def estimable(config: Any) -> bool:
    return config.judge == "llm"


def dry_run(config: Any, rows: list[dict[str, Any]]) -> str:
    """`prefloop judge --dry-run`: the estimate for the rows not yet in `config.out`; nothing is sent or written."""
    try:
        done = read_ids(config.out)
    except Exception:  # an unreadable output is the real run's to report
        done = set()
    todo = [r for r in rows if r["id"] not in done]
    head = (f"prefloop judge --dry-run: nothing sent, nothing written. {len(todo)} rows to judge "
            f"({len(rows) - len(todo)} already in {config.out}).")
    if not uses_generator(config.judge):
        return f"{head}\n  cost: none billed (judge {config.judge} runs locally)"
    if not estimable(config):
        return (f"{head}\n  no estimate: a {config.judge} judge's requests depend on its own answers "
                "(with --max-budget-usd its spend is checked before every request)")
    costs = JudgeCosts(config)
    requests, tokens = costs.tally(todo)
    tries = 1 + config.parse_retries
    completion = requests * config.judge_max_new_tokens
    lines = [
        head,
        f"  judge {config.judge_model!r}, {config.mode}: {requests} requests (first attempts; up to {requests * tries} "
        f"with {config.parse_retries} parse retries each)",
        f"  prompt tokens: {tokens} for the first attempts ({costs.counter.method})",
        f"  completion tokens: at most {completion} (judge_max_new_tokens {config.judge_max_new_tokens} x "
        f"{requests} requests), {completion * tries} with every parse retry",
    ]
    if config.judge_backend != "openai":
        return "\n".join([*lines, f"  cost: none billed (backend {config.judge_backend} runs locally)"])
    return "\n".join(lines + cost_lines(costs.price, config.judge_model, (tokens, 0),
                                        (tokens * tries, completion * tries), config.max_budget_usd,
                                        spent_on(config, "judge")))
