"""The judge stage: candidates in, one judgments record per prompt out.

    prefloop judge --candidates c.jsonl --out j.jsonl --judge python --reward-fn rewards.py:fn
    prefloop judge --candidates c.jsonl --out j.jsonl --judge reward_model --reward-model PATH
    prefloop judge --candidates c.jsonl --out j.jsonl --judge llm --judge-model M --judge-backend hf|vllm|openai \
        [--base-url U] --mode pairwise|pointwise [--template NAME|FILE.yaml]
    prefloop judge --candidates c.jsonl --out j.jsonl --judge ensemble --members members.yaml [--combine vote] \
        [--drop-disagreements]                       # several judges in turn, combined (judge/ensemble.py)

The summary beside the output (`j.summary.json`) carries the judge's statistics (`judge/stats.py`): agreement
between orders, first-position win rate, tie, parse-error and refusal rates; with an openai judge backend, its API
`usage` (priced with `--prices`). `--max-budget-usd` stops the stage cleanly (prefloop/budget.py) and `--dry-run`
prints the estimate (judge/cost.py).

Failure semantics: the candidates file is validated whole before the judge loads. Rows are judged in chunks and
each chunk is fsynced before the next; a re-run resumes by id and keeps existing records byte-for-byte. Per
completion, a failed judgment is stored with its status and reason and a null score.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefloop.budget import Meter, check_budget
from prefloop.config import ConfigError, config_hash, field, from_dict, hashed_dict
from prefloop.engine import check_engine, load_executor
from prefloop.errors import StageFailed
from prefloop.judge import KINDS, Judge, JudgeKind, judge_kind
from prefloop.judge.cache import JudgeCache, fingerprint, resolve_dir
from prefloop.judge.stats import FAILURES, judge_stats
from prefloop.judge.templates import Template, load_template
from prefloop.lock import exclusive
from prefloop.progress import Progress
from prefloop.runstate import StageRun
from prefloop.store import InputError, JsonlStore, iter_records

log = logging.getLogger(__name__)

# Where the judging runs (`--engine`): the executor classes, by name (prefloop/engine.py), so this stage never
# imports an engine. Each is built as `cls(config, judge or None, meter)` and turns pending rows into batches.
JUDGE_EXECUTORS = {"local": "prefloop.judge.stage:LocalJudges", "ray": "prefloop.ray_engine:RayJudges"}


@dataclass
class JudgeConfig:
    candidates: str = field(help="Candidates JSONL written by `prefloop generate`.")
    out: str = field(help="Judgments JSONL to write (appended to on resume).", hash=False)
    judge: str = field("python", help=f"Judge: {', '.join(KINDS)}, or ensemble (several of them, combined).")
    reward_fn: str | None = field(None, help="python: FILE.py:function or module:function.")
    # ensemble (judge/ensemble.py)
    members: Any = field(None, help="ensemble: the member judges, one judge config each (the keys of `prefloop "
                         "judge`): a YAML/JSON file or an inline YAML list, e.g. '[{judge: python, reward_fn: "
                         "r.py:f}, {judge: reward_model, reward_model: PATH}]'. They run in turn, each into "
                         "<stem>.members/<i>.jsonl.", hash=False)  # hashed as member_hashes: their own configs
    member_hashes: list[str] = field([], help="(derived) each ensemble member's config hash.", cli=False)
    combine: str = field("mean", help="ensemble: mean (of each member's rank-normalized scores) or vote (for the "
                         "candidates a member ranks best, against those it ranks worst).")
    drop_disagreements: bool = field(False, help="ensemble: mark prompts on which the members share no best or no "
                                     "worst candidate; `prefloop pairs` drops their pairs.")
    # reward_model
    reward_model: str | None = field(None, help="reward_model: a sequence-classification model directory or hub id.")
    rm_output: str = field("0", help="reward_model: which output is the score: an index or a label name.")
    rm_template: str = field("auto", help="reward_model: format (prompt, response) with: chat, raw, or auto.")
    max_length: int | None = field(None, help="reward_model: longest input in tokens (default: the model's).")
    # llm
    judge_model: str | None = field(
        None, help="llm: the judge model (directory, hub id, or server model name); in the loop, `policy` = "
        "the current policy judges its own samples (self-rewarding).")
    judge_adapter: str | None = field(None, help="llm: a LoRA adapter on top of --judge-model.")
    judge_backend: str = field("hf", help="llm: generation backend of the judge: hf, vllm, openai, auto.")
    mode: str | None = field(None, help="llm: pairwise (both orders, knockout; the default) or pointwise (a "
                             "rating); constitutional: revise (the default) or feedback.")
    template: str | None = field(None, help="llm: built-in template name or a YAML file (default: the mode's).")
    template_sha256: str | None = field(None, help="(derived) hash of the template's text.", cli=False)
    # constitutional
    constitution: str | None = field(None, help="constitutional: a built-in name (harmless, helpful_honest) or a "
                                     "YAML/JSON file (prefloop's schema or the HF CAI recipe's layout).")
    constitution_sha256: str | None = field(None, help="(derived) hash of the constitution's text.", cli=False)
    revisions: int = field(1, help="constitutional revise: critique -> revision passes per answer.")
    verifier: dict = field({}, help="constitutional revise: a judge that must prefer the revision to the original, "
                           "e.g. {judge: reward_model, reward_model: PATH}; others are dropped.")
    principles_per_comparison: int = field(1, help="constitutional feedback: principles averaged per comparison.")
    cot: bool = field(False, help="constitutional feedback: reason step by step before the (A)/(B) answer.")
    cot_clamp: list[float] = field([0.4, 0.6], help="constitutional feedback with cot: clamp each probability "
                                   "to this band (as the CAI paper did).")
    min_confidence: float = field(0.5, help="constitutional feedback: drop comparisons whose p_chosen is lower.")
    judge_max_new_tokens: int = field(512, help="llm / constitutional: longest judge answer in tokens.")
    judge_temperature: float = field(0.0, help="llm: judge sampling temperature (0 = greedy).")
    top_logprobs: int = field(5, help="llm: read verdict probabilities from this many top log-probs (0: text only).")
    parse_retries: int = field(2, help="llm: ask again this many times when an answer has no verdict.")
    retry_temperature: float = field(0.7, help="llm: temperature of those retries (so a greedy judge varies).")
    judge_chat: bool = field(True, help="llm: send the judge prompt as chat messages (else as raw text).")
    base_url: str | None = field(None, help="llm with backend openai: the server URL.", hash=False)
    api_key_env: str = field("OPENAI_API_KEY", help="llm with backend openai: env var holding the key.", hash=False)
    judge_engine: dict = field({}, help="llm: extra backend options, e.g. {concurrency: 32} or {engine_kwargs: "
                               "{max_model_len: 8192}}.", hash=False)
    dtype: str = field("auto", help="reward_model / llm (hf, vllm): model dtype.", hash=False)
    seed: int = field(0, help="llm: seed for sampling and the tournament bracket.")
    batch_size: int = field(256, help="Completions per judge call (python); sequences per forward (models).",
                            hash=False)
    chunk_size: int = field(256, help="Prompts per persisted chunk.", hash=False)
    max_failed_fraction: float = field(
        0.5, help="Stop the stage when more than this share of judgments (completions scored, or comparisons) fail. "
        "Failures are kept as failures, never labels; past this share the data would be thin or the judge broken.",
        hash=False,  # what a record means does not depend on it: raise it and re-run to resume
    )
    cache: str = field("auto", help="Judge cache directory for model judges: auto (~/.cache/prefloop/judge or "
                       "$PREFLOOP_CACHE_DIR), off, or a path.", hash=False)
    new_run: bool = field(False, help="Move an existing output aside and start again.", hash=False)
    # API spend (prefloop/budget.py). Not hashed: a budget or a price does not change what a record means.
    prices: Any = field(None, help="llm/constitutional on openai: USD per million tokens per model, to price the "
                        "usage in the summary: a YAML/JSON file or inline, e.g. '{MODEL: {input_per_mtok: 0.15, "
                        "output_per_mtok: 0.6}}'. prefloop has no built-in prices.", hash=False)
    max_budget_usd: float | None = field(
        None, help="llm/constitutional on openai: stop the stage cleanly (exit 2, everything finished kept) before "
        "a chunk that could take the spend on this output past this many USD, or once it has; raise it and re-run "
        "to resume. Needs --prices for the judge model.", hash=False)
    spent_before_usd: float = field(0.0, help="(set by the loop) what the run's other stages spent, counted "
                                    "against max_budget_usd.", hash=False, cli=False)
    dry_run: bool = field(False, help="llm: print the requests, tokens and (with --prices) cost this run would "
                          "take, then exit without sending or writing anything.", hash=False)
    # Engine (prefloop/ray_engine.py, docs/scaling.md); `judge_engine` above is the backend's options, not this.
    # Not hashed: where the work runs does not change what a record means (resume on either engine).
    engine: str = field("local", help="Where to run: local (this process) or ray (Ray Data actors; needs "
                        "`pip install 'prefloop[ray]'`).", hash=False)
    ray_address: str | None = field(None, help="ray: cluster address (default: $RAY_ADDRESS, else start a local "
                                    "cluster).", hash=False)
    ray_actors: int = field(1, help="ray: judge replicas (actors); each loads the judge once.", hash=False)
    ray_num_cpus: float = field(1.0, help="ray: CPUs reserved per actor.", hash=False)
    ray_num_gpus: float = field(0.0, help="ray: GPUs reserved per actor.", hash=False)
    ray_batch_size: int = field(64, help="ray: candidate rows per actor call; the driver persists each as it "
                                "arrives.", hash=False)

    def __post_init__(self) -> None:
        check_engine(self, tuple(JUDGE_EXECUTORS))
        if self.max_budget_usd is not None and (self.judge == "ensemble" or self.engine != "local"):
            raise ConfigError("max_budget_usd needs one judge on engine local (an ensemble's members and Ray "
                              "workers meter their own requests). Fix: set max_budget_usd on the members, or drop it.")
        if self.judge == "ensemble":
            from prefloop.judge.ensemble import check

            check(self)
            return
        if self.judge not in KINDS:
            raise ConfigError(f"judge = {self.judge!r}. Fix: use one of {', '.join(KINDS)}, ensemble.")
        options = self.options()
        for key, value in options.derived().items():
            setattr(self, key, value)
        models = options.api_models()
        check_budget(self.max_budget_usd, self.prices, models, bool(models), "judge")

    def options(self) -> JudgeKind:
        """This judge kind's options (`prefloop.judge.KINDS`), read from these flags and checked."""
        return judge_kind(self.judge).from_config(self)

    def api_models(self) -> list[str]:
        """The models this judge sends API requests to (its own, its verifier's): what a budget needs prices for."""
        return [] if self.judge == "ensemble" else self.options().api_models()

    def load_judge(self) -> Judge:
        """The judge these flags name, loaded (a bad --reward-fn, model or template: one ConfigError)."""
        options = self.options()
        try:
            return options.load(self.judge_cache() if options.cached else None)
        except (ValueError, AttributeError, ImportError, FileNotFoundError, OSError) as e:
            raise ConfigError(f"--judge {self.judge}: {e}") from None

    def judge_cache(self) -> JudgeCache | None:
        directory = resolve_dir(self.cache)
        return JudgeCache(directory, config_hash(self.identity())) if directory else None

    def verifier_config(self) -> JudgeConfig:
        values = {"candidates": self.candidates, "out": self.out, "cache": self.cache, "dtype": self.dtype,
                  **self.verifier}
        if values.get("judge") == "constitutional":
            raise ConfigError("verifier: a constitutional judge cannot verify itself. Fix: use reward_model or llm.")
        return from_dict(JudgeConfig, values, "verifier")

    def load_template(self) -> Template:
        return load_template(self.template, self.mode)

    def identity(self) -> dict[str, Any]:
        """What makes two judges give the same answers: the cache's key (weights fingerprinted, not just named)."""
        values = hashed_dict(self)
        for key in ("candidates", "chunk_size", "reward_fn", "member_hashes", "combine", "drop_disagreements"):
            values.pop(key, None)
        values.update(reward_model=fingerprint(self.reward_model), judge_model=fingerprint(self.judge_model),
                      judge_adapter=fingerprint(self.judge_adapter), dtype=self.dtype)
        return values


def load_candidates(path: str | Path) -> list[dict[str, Any]]:
    """Read and check a candidates file; `InputError` names file:line and the missing field."""
    rows, lines = [], {}
    for lineno, row in iter_records(path):
        for key in ("id", "prompt", "completions"):
            if key not in row:
                raise InputError(
                    f"{path}:{lineno}: missing field `{key}`. Fix: pass a file written by `prefloop generate`."
                )
        if not isinstance(row["completions"], list) or not all(
            isinstance(c, dict) and isinstance(c.get("text"), str) for c in row["completions"]
        ):
            raise InputError(f"{path}:{lineno}: `completions` must be a list of objects with a `text` string.")
        if row["id"] in lines:
            raise InputError(
                f"{path}:{lineno}: id {row['id']!r} repeats line {lines[row['id']]}. "
                "Fix: `prefloop merge` the file (it unions by id) or drop the duplicate row."
            )
        lines[row["id"]] = lineno
        rows.append(row)
    return rows


def run(config: JudgeConfig) -> Path | str:
    """Judge every candidates record into `config.out`; return its path. See module docstring. With `dry_run`,
    return the estimate (judge/cost.py) instead: nothing is sent, written or locked."""
    if config.dry_run:
        from prefloop.judge.cost import dry_run

        return dry_run(config, load_candidates(config.candidates))
    return _run(config)


@exclusive
def _run(config: JudgeConfig) -> Path:
    if config.judge == "ensemble":
        from prefloop.judge.ensemble import run as run_ensemble

        return run_ensemble(config)
    out = Path(config.out)
    rows = load_candidates(config.candidates)
    # A python judge loads before anything is written: a wrong --reward-fn must fail without leaving an output.
    # Model judges load only when there is work (they are slow to load, and a finished stage needs none).
    judge_ = config.load_judge() if config.judge == "python" else None
    state = StageRun("judge", out, config)
    if state.begin(config.new_run) == "done":
        log.info("%s is complete (config %s); nothing to do", out, state.hash)
        if judge_ is not None:
            judge_.close()
        return out
    if config.engine == "ray" and judge_ is not None:
        judge_.close()  # loaded only to fail early on a bad --reward-fn; the actors load their own
        judge_ = None
    # The executor turns pending rows into (row, verdict, judge) batches; this driver alone writes and counts.
    meter = Meter("judge", out, config.prices, config.max_budget_usd, config.spent_before_usd,
                  state.summary().get("usage"))
    executor = load_executor(JUDGE_EXECUTORS, config.engine)(config, judge_, meter)
    tally = Tally(config.max_failed_fraction)
    with JsonlStore(out) as store, meter.enforce(lambda: state.finish(
            "budget_exceeded", prompts=len(rows), judged=len(store.done) - (len(rows) - len(todo)),
            **executor.summary(), **meter.summary())):
        todo = [r for r in rows if r["id"] not in store.done]
        progress = Progress(len(rows), "judge", initial=len(rows) - len(todo))
        try:
            for batch in executor.batches(todo):
                records = [_judgment(row, verdict, judge, state.hash) for row, verdict, judge in batch]
                failure = tally.add(records)
                if failure:  # the batch that crosses the ceiling is not written: a fixed re-run judges it again
                    if store.done or not state.forget_if_empty():
                        state.finish("failed", prompts=len(rows), judged=tally.rows - len(records), error=failure,
                                     **executor.summary(), **meter.summary())
                    raise StageFailed(f"judge: {failure} Rows judged before are kept in {out}. Fix: remove the "
                                      "first error's cause (or raise --max-failed-fraction to keep failures on "
                                      "record), then re-run the same command to resume.")
                for record in records:
                    store.append(record)
                store.commit()
                progress.update(done=len(records) - tally.last_failed, failed=tally.last_failed)
                if meter.active:  # the spend so far, in case this process dies: a resumed run counts on from it
                    state.finish("running", **meter.summary())
        finally:
            progress.close()
            executor.close()

    stats = judge_stats((row for _, row in iter_records(out)), first_label=config.options().first_label())
    state.finish("done", prompts=len(rows), judged=len(todo), completion_statuses=dict(tally.statuses),
                 stats=stats, failed_units=tally.failed, **executor.summary(), **meter.summary())
    failures = {f"{f}_rate": stats[f"{f}_rate"] for f in FAILURES if stats.get(f"{f}_rate")}
    if failures:
        log.warning("judge: %s (failures are kept as failures, never labels)", failures)
    return out


class Tally:
    """The judge stage's counts and its failure ceiling.

    The unit is what the judge labels: a comparison for pairwise judges, a completion for scoring ones. A batch
    whose cumulative failure share (this run's units so far, the batch included) exceeds `ceiling` stops the stage
    before it is written, so a judge that fails everything (a reward function that raises, a context too small for
    the judge prompt) stops at its first batch, and a healthy run is not stopped by a bad tail.
    """

    def __init__(self, ceiling: float) -> None:
        self.ceiling = ceiling
        self.statuses: Counter[str] = Counter()
        self.rows = self.units = self.failed = self.last_failed = 0
        self.first_error: str | None = None

    def add(self, records: list[dict[str, Any]]) -> str | None:
        """Count `records`; return the ceiling's one-line message if they cross it, else None."""
        self.rows += len(records)
        self.last_failed = 0
        for record in records:
            self.statuses.update(record["statuses"])
            units = record.get("comparisons") or [{"status": s, "error": e} for s, e in
                                                  zip(record["statuses"], record["errors"], strict=True)]
            bad = [u for u in units if u["status"] in FAILURES]
            self.units += len(units)
            self.failed += len(bad)
            self.last_failed += record["status"] not in ("ok", "tie")
            if bad and self.first_error is None:
                u = bad[0]
                why = u.get("error") or next((e for e in u.get("errors") or [] if e), None) or "no detail"
                self.first_error = f"{record['id']!r}: {u['status']}: {why}"
        if self.failed and self.failed > self.ceiling * self.units:
            what = "comparisons" if records and records[0].get("comparisons") is not None else "completions"
            return (f"{self.failed} of {self.units} {what} failed (over the ceiling max_failed_fraction="
                    f"{self.ceiling}); the first: {' '.join(str(self.first_error).split())[:400]}.")
        return None


class LocalJudges:
    """The local executor: this process's judge, one call per `chunk_size` rows."""

    def __init__(self, config: JudgeConfig, judge: Judge | None, meter: Meter | None = None) -> None:
        self.config, self.judge, self.meter, self.costs = config, judge, meter, None
        self.load_s: float | None = None  # loading a model judge: a fixed cost per run

    def batches(self, todo: list[dict[str, Any]]) -> Iterator[list[tuple[dict[str, Any], dict[str, Any], Judge]]]:
        for start in range(0, len(todo), self.config.chunk_size):
            if self.judge is None:
                started = time.perf_counter()
                self.judge = self.config.load_judge()
                self.load_s = round(time.perf_counter() - started, 3)
            chunk = todo[start : start + self.config.chunk_size]
            if self.meter is not None:  # counts the judge's API requests; with a budget, checks the chunk first
                self.meter.watch(self.judge)
                if self.meter.limit is not None:
                    self.meter.before_chunk(self._worst(chunk), len(chunk))
            yield list(zip(chunk, self.judge.judge(chunk), [self.judge] * len(chunk), strict=True))

    def _worst(self, chunk: list[dict[str, Any]]) -> float:
        from prefloop.judge.cost import JudgeCosts, estimable

        if not estimable(self.config):
            return 0.0  # a constitutional chain: checked per request only
        self.costs = self.costs or JudgeCosts(self.config)
        return self.costs.worst(chunk)

    def summary(self) -> dict[str, Any]:
        extra: dict[str, Any] = {"engine": "local"}
        if self.load_s is not None:
            extra["load_s"] = self.load_s
        cache = getattr(self.judge, "cache", None)
        if getattr(cache, "hits", None) is not None:
            extra["cache"] = {"hits": cache.hits, "misses": cache.misses}
        if self.judge is not None and hasattr(self.judge, "calls"):
            extra["judge_calls"] = self.judge.calls
        return extra

    def close(self) -> None:
        if self.judge is not None:
            self.judge.close()


def _judgment(row: dict[str, Any], verdict: dict[str, Any], judge: Judge, chash: str) -> dict[str, Any]:
    comparisons = verdict.get("comparisons")
    if comparisons is not None:
        bad = [c["status"] for c in comparisons if c["status"] in FAILURES]
    else:
        bad = [s for s in verdict["statuses"] if s != "ok"]
    record = {
        "id": row["id"],
        "prompt": row["prompt"],
        "completions": verdict.get("completions", row["completions"]),  # a reviser adds its revision
        "judge": judge.name,
        "scores": verdict["scores"],
        "statuses": verdict["statuses"],
        "errors": verdict["errors"],
        # Row status per docs/architecture.md "Records": "ok" when every completion (or comparison) was judged, else the first
        # failure's status (per-completion detail is in `statuses` and `errors`, per match in `comparisons`).
        "status": bad[0] if bad else "ok",
        "round": row.get("round", 0),
        "config_hash": chash,
    }
    for key in ("comparisons", "raw", "details", "revision"):
        if verdict.get(key) is not None:
            record[key] = verdict[key]
    if row.get("chat_template_kwargs"):  # how generate rendered the prompt (tools...): the pairs pass it to TRL
        record["chat_template_kwargs"] = row["chat_template_kwargs"]
    if getattr(judge, "info", None):
        record["judge_info"] = judge.info
    return record
