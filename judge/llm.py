"""The `llm` judge: a language model grades candidates through any generator backend (hf, vllm, openai).

    prefloop judge --candidates c.jsonl --out j.jsonl --judge llm --judge-model M --judge-backend vllm \
        --mode pairwise                                # or pointwise; --template NAME|FILE.yaml

With the policy as `--judge-model` (in the loop: `judge_model: policy`) this is self-rewarding.

A prompt that is a conversation reaches the judge whole, one tag per turn with the last one marked (see
judge/templates.py): the history is context, and what is rated is only the response, the next assistant turn.

**Pointwise**: each completion is rated on the template's scale (default: an additive 0-5 rubric).

**Pairwise**, both orders: every comparison is asked twice, with the two responses swapped. The orders agree ->
a label (the winner, with `p_chosen`); they disagree -> a tie, counted and never a label. A judge that always
picks the first slot therefore produces ties only, and its first-position win rate (in the stage summary and
the loop report) reads 100%.

For N candidates the judge runs a **knockout tournament**: a seeded bracket over the distinct non-empty texts;
each match is judged in both orders; the winner advances (after a tie or a failed match a seeded coin picks who
advances, and the match gives no label). That is N-1 matches, 2(N-1) judge calls per prompt -- O(N), where
all-pairs would be O(N^2). Every decided match is a judged (winner, loser) pair; `prefloop pairs` takes the
champion's widest win (`best_worst`), a random one of its wins (`best_random`), or every decided match
(`all_above_margin`).

**Failures** are never labels. An answer without a verdict on its last line is asked again (up to
`parse_retries` times, sampled at `retry_temperature` so a greedy judge does not repeat itself), then stored as
`parse_error` with every raw answer; a declined answer is a `refusal`; a request the backend could not serve is
an `error`. **Probabilities**: where the backend returns top log-probs, the verdict's probability comes from the
log-probs at the verdict token (pairwise: p(A) vs p(B), averaged over both orders; pointwise: the expected score),
else from the text (p = 1).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from prefloop.config import ConfigError
from prefloop.gen import BACKENDS as GEN_BACKENDS
from prefloop.gen import GenerationAborted, Sampling, encode_prompt, load_generator, resolve_backend
from prefloop.judge import Verdict
from prefloop.judge.cache import JudgeCache
from prefloop.judge.templates import Template, load_template, messages, parse, render, verdict_probabilities
from prefloop.judge.tournament import Match, knockout

log = logging.getLogger(__name__)


class LLMJudge:
    """Judges with `generator` (any `Generator`) and `template`; see module docstring."""

    def __init__(self, generator, template: Template, *, max_new_tokens: int = 512, temperature: float = 0.0,
                 top_logprobs: int = 5, parse_retries: int = 2, retry_temperature: float = 0.7, seed: int = 0,
                 chat: bool = True, cache: JudgeCache | None = None, info: dict[str, Any] | None = None) -> None:
        self.generator, self.template = generator, template
        self.mode = template.mode
        self.max_new_tokens, self.temperature, self.top_logprobs = max_new_tokens, temperature, top_logprobs
        self.parse_retries, self.retry_temperature, self.seed, self.chat = parse_retries, retry_temperature, seed, chat
        self.cache = cache
        self.name = f"llm:{generator.name}:{template.name}"
        self.info = info or {}
        self.calls = 0  # judge requests actually sent (cache hits excluded)

    # -- asking ------------------------------------------------------------------------------------------------

    def _judge_input(self, text: str) -> Any:
        if self.chat:
            return messages(self.template, text)
        return (self.template.system + "\n\n" if self.template.system else "") + text

    def ask(self, texts: list[str]) -> list[dict[str, Any]]:
        """One answer per rendered instruction: {value, status, error, raw: [every attempt's text], probs}."""
        inputs = [self._judge_input(t) for t in texts]
        answers: list[dict[str, Any]] = [
            {"value": None, "status": "error", "error": None, "raw": [], "probs": None} for _ in texts
        ]
        pending = []
        for i, judge_input in enumerate(inputs):
            reason = too_long(self.generator, judge_input, self.max_new_tokens)
            if reason:
                answers[i]["error"] = reason
            else:
                pending.append(i)
        for attempt in range(self.parse_retries + 1):
            if not pending:
                break
            completions = self._complete([inputs[i] for i in pending], attempt)
            retry = []
            for i, completion in zip(pending, completions, strict=True):
                answer = answers[i]
                if completion is None:
                    answer.update(status="error", error="the judge backend failed this request")
                    continue
                answer["raw"].append(completion["text"])
                value, status, error = parse(self.template, completion["text"],
                                             completion.get("finish_reason") == "length")
                answer.update(value=value, status=status, error=error)
                if status == "ok":
                    answer["probs"] = verdict_probabilities(self.template, completion, value)
                elif attempt < self.parse_retries:
                    retry.append(i)
            pending = retry
        return answers

    def _complete(self, inputs: list[Any], attempt: int) -> list[dict[str, Any] | None]:
        temperature = self.temperature if attempt == 0 else max(self.temperature, self.retry_temperature)
        sampling = Sampling(max_new_tokens=self.max_new_tokens, temperature=temperature,
                            seed=(self.seed + 1_000_003 * attempt) % 2**31, top_logprobs=self.top_logprobs)
        out, sent = complete(self.generator, inputs, sampling, self.cache,
                             keep=lambda c: parse(self.template, c["text"])[1] == "ok", key=attempt)
        self.calls += sent
        return out

    # -- judging -----------------------------------------------------------------------------------------------

    def judge(self, rows: list[dict[str, Any]]) -> list[Verdict]:
        return self._pointwise(rows) if self.mode == "pointwise" else self._pairwise(rows)

    def _pointwise(self, rows: list[dict[str, Any]]) -> list[Verdict]:
        units = [(r, i) for r, row in enumerate(rows) for i in range(len(row["completions"]))]
        texts = [render(self.template, rows[r]["prompt"], [rows[r]["completions"][i]["text"]]) for r, i in units]
        answers = self.ask(texts)
        verdicts = [_empty(len(row["completions"])) for row in rows]
        for (r, i), answer in zip(units, answers, strict=True):
            v = verdicts[r]
            score = answer["value"]
            if answer["status"] == "ok" and answer["probs"]:
                score = sum(int(k) * p for k, p in answer["probs"].items())  # the expected score
            v["scores"][i] = None if answer["status"] != "ok" else float(score)
            v["statuses"][i], v["errors"][i] = answer["status"], answer["error"]
            v["raw"][i] = answer["raw"]
            v["details"][i] = {"text_score": answer["value"], "probs": answer["probs"]}
        return verdicts

    def _pairwise(self, rows: list[dict[str, Any]]) -> list[Verdict]:
        def play(matches: list[Match], bracket_round: int) -> list[dict[str, Any]]:
            texts = []
            for r, a, b in matches:
                prompt, completions = rows[r]["prompt"], rows[r]["completions"]
                texts.append(render(self.template, prompt, [completions[a]["text"], completions[b]["text"]]))
                texts.append(render(self.template, prompt, [completions[b]["text"], completions[a]["text"]]))
            answers = self.ask(texts)
            return [self._combine(a, b, answers[2 * m], answers[2 * m + 1], bracket_round)
                    for m, (_, a, b) in enumerate(matches)]

        verdicts = []
        for row, comps in zip(rows, knockout(rows, self.seed, play), strict=True):
            v = _empty(len(row["completions"]))
            v["statuses"] = ["ok"] * len(row["completions"])
            v["comparisons"] = comps
            verdicts.append(v)
        return verdicts

    def _combine(self, a: int, b: int, ab: dict[str, Any], ba: dict[str, Any], bracket_round: int) -> dict[str, Any]:
        """One match from its two orders: `ab` shows a in the first slot, `ba` shows b there."""
        first, second = self.template.labels
        comparison: dict[str, Any] = {
            "round": bracket_round, "a": a, "b": b, "verdicts": [ab["value"], ba["value"]],
            "status": "ok", "winner": None, "raw": [ab["raw"], ba["raw"]], "errors": [ab["error"], ba["error"]],
        }
        failed = [x["status"] for x in (ab, ba) if x["status"] != "ok"]
        if failed:
            comparison["status"] = failed[0]
            return comparison
        a_wins = [ab["value"] == first, ba["value"] == second]
        if a_wins[0] != a_wins[1]:
            comparison["status"] = "tie"  # the orders disagree: position, not quality, decided
            return comparison
        winner = a if a_wins[0] else b
        comparison["winner"], comparison["loser"] = winner, b if winner == a else a
        if ab["probs"] and ba["probs"]:
            p_a = (ab["probs"][first] + ba["probs"][second]) / 2
            comparison["p_chosen"] = round(p_a if winner == a else 1 - p_a, 6)
            comparison["p_source"] = "logprobs"
        else:
            comparison["p_chosen"], comparison["p_source"] = 1.0, "text"
        return comparison

    def close(self) -> None:
        self.generator.close()


def _empty(n: int) -> Verdict:
    return {"scores": [None] * n, "statuses": ["error"] * n, "errors": [None] * n, "raw": [None] * n,
            "details": [None] * n}


def too_long(generator, judge_input: Any, max_new_tokens: int) -> str | None:
    """Why `judge_input` cannot fit the judge model's context with `max_new_tokens`, or None. Checked per input
    before sending, so one over-long input fails alone (local backends refuse a whole call otherwise)."""
    tokenizer, context = getattr(generator, "tokenizer", None), getattr(generator, "max_context", None)
    if tokenizer is None or not context:
        return None  # a server: it refuses an over-long request itself, and that request fails alone
    length = len(encode_prompt(tokenizer, judge_input, generator.name))
    if length + max_new_tokens > context:
        return (f"the judge prompt has {length} tokens; with max_new_tokens={max_new_tokens} the judge's "
                f"context of {context} fits at most {max(context - max_new_tokens, 0)}")
    return None


def complete(generator, inputs: list[Any], sampling: Sampling, cache: JudgeCache | None,
             keep: Callable[[dict[str, Any]], bool] = lambda c: True, key: Any = None,
             ) -> tuple[list[dict[str, Any] | None], int]:
    """One completion per input (None where the backend failed it), from `cache` where possible; completions
    that pass `keep` are cached under (input, `key`, sampling). Returns them and the number of requests sent."""
    params = dict(sampling.__dict__)
    if params.get("chat_template_kwargs") is None:  # judges set none: keys stay those of caches written before it
        params.pop("chat_template_kwargs", None)
    keys = [JudgeCache.key(x, key, params) for x in inputs]
    out: list[dict[str, Any] | None] = [cache.get(k) if cache else None for k in keys]
    missing = [i for i, c in enumerate(out) if c is None]
    if missing:
        aborted = None
        try:
            results = generator.generate([inputs[i] for i in missing], n=1, sampling=sampling)
        except GenerationAborted as e:  # a quota or budget stop: cache the answers already paid for, then stop
            aborted, results = e, e.partial
        for i, result in zip(missing, results, strict=True):
            out[i] = result[0] if result else None
            if out[i] is not None and cache is not None and keep(out[i]):
                cache.put(keys[i], out[i])
        if cache is not None:
            cache.flush()
        if aborted is not None:
            raise aborted
    return out, len(missing)


def check_model_judge(config: Any, kind: str, modes: tuple[str, ...]) -> str:
    """The flags a judge on a generation backend (llm, constitutional) shares, checked; returns its mode (the
    first of `modes` by default)."""
    mode = config.mode or modes[0]
    if mode not in modes:
        raise ConfigError(f"--judge {kind} --mode {mode!r}. Fix: use one of {', '.join(modes)}.")
    if not config.judge_model:
        raise ConfigError(f"--judge {kind} needs --judge-model (a model path, hub id, or server model name).")
    if config.judge_backend not in GEN_BACKENDS:
        raise ConfigError(f"judge_backend = {config.judge_backend!r}. Fix: use one of {', '.join(GEN_BACKENDS)}.")
    if config.judge_backend == "openai" and not config.base_url:
        raise ConfigError("--judge-backend openai needs --base-url (e.g. http://127.0.0.1:8000/v1).")
    if config.parse_retries < 0 or config.top_logprobs < 0 or config.judge_max_new_tokens < 1:
        raise ConfigError("need parse_retries >= 0, top_logprobs >= 0 and judge_max_new_tokens >= 1.")
    if len(config.cot_clamp) != 2 or not 0 <= config.cot_clamp[0] <= 0.5 <= config.cot_clamp[1] <= 1:
        raise ConfigError("cot_clamp must be two probabilities around 0.5, e.g. [0.4, 0.6].")
    return mode


@dataclass
class Backend:
    """The generation backend a model judge runs on: --judge-backend, --judge-model, --judge-adapter, and the
    backend's options (--judge-engine over the defaults below)."""

    name: str  # hf, vllm, openai or auto (resolved when loaded)
    model: str
    adapter: str | None
    dtype: str
    batch_size: int
    base_url: str | None
    api_key_env: str
    extra: dict[str, Any]

    @classmethod
    def from_config(cls, config: Any) -> Backend:
        return cls(config.judge_backend, config.judge_model, config.judge_adapter, config.dtype, config.batch_size,
                   config.base_url, config.api_key_env, dict(config.judge_engine))

    def load(self) -> tuple[Any, str]:
        """The generator, and the backend name `auto` resolved to."""
        name = resolve_backend(self.name)
        if name == "openai":
            options: dict[str, Any] = {"base_url": self.base_url, "api_key_env": self.api_key_env}
        elif name == "hf":
            options = {"dtype": self.dtype, "batch_size": min(self.batch_size, 64)}
        else:
            options = {"dtype": self.dtype}
        return load_generator(name, self.model, adapter=self.adapter, **{**options, **self.extra}), name

    def api_models(self) -> list[str]:
        return [self.model] if self.name == "openai" else []


@dataclass
class LLMOptions:
    """The `llm` judge kind (registered in `prefloop.judge.KINDS`): a template and the judge's sampling."""

    backend: Backend
    mode: str
    template: Template
    template_name: str
    max_new_tokens: int = 512
    temperature: float = 0.0
    top_logprobs: int = 5
    parse_retries: int = 2
    retry_temperature: float = 0.7
    seed: int = 0
    chat: bool = True

    generator: ClassVar[bool] = True
    cached: ClassVar[bool] = True

    @classmethod
    def from_config(cls, config: Any) -> LLMOptions:
        mode = check_model_judge(config, "llm", ("pairwise", "pointwise"))
        try:
            template = load_template(config.template, mode)
        except (ValueError, FileNotFoundError) as e:
            raise ConfigError(str(e)) from None
        return cls(Backend.from_config(config), mode, template, config.template or mode, config.judge_max_new_tokens,
                   config.judge_temperature, config.top_logprobs, config.parse_retries, config.retry_temperature,
                   config.seed, config.judge_chat)

    def derived(self) -> dict[str, Any]:
        return {"mode": self.mode, "template_sha256": self.template.sha256}

    def first_label(self) -> str:
        return self.template.labels[0] if self.mode == "pairwise" else "A"

    def api_models(self) -> list[str]:
        return self.backend.api_models()

    def pairwise(self) -> bool:
        return self.mode == "pairwise"

    def rewrites(self) -> bool:
        return False

    def load(self, cache: JudgeCache | None = None) -> LLMJudge:
        generator, engine = self.backend.load()
        info = {"engine": engine, "model": self.backend.model, "adapter": self.backend.adapter, "mode": self.mode,
                "template": self.template_name}
        return LLMJudge(generator, self.template, max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                        top_logprobs=self.top_logprobs, parse_retries=self.parse_retries,
                        retry_temperature=self.retry_temperature, seed=self.seed, chat=self.chat, cache=cache,
                        info=info)
