"""The on-policy loop: the policy trained in round k generates round k+1's data.

    prefloop run --config examples/demo.yaml            # flags override the YAML: --rounds 8

Before any round, training prompts that match an eval prompt (or a prompt of a benchmark named in
`decontaminate.benchmarks`) leave the pool: exact, 13/8-gram overlap, or MinHash near-duplicates
(`prefloop/hygiene.py`); the log line and `manifest.json` ("decontamination") say how many and why.

Round 0 only evaluates the initial policy (the baseline). Each round k >= 1 runs, in order:

    prompts  - draw this round's prompts from the pool (seeded by round, so a resumed run draws the same ones)
    generate - policy k-1 (base + adapter k-1) samples `gen.n` completions per prompt
    judge    - score every completion
    pairs    - chosen/rejected pairs (this round's, or all rounds' with `data: accumulate`); with `kto_threshold`,
               every answer labelled by its score instead (`labels.jsonl`, KTO's unpaired rows); with
               `train.method: grpo`, every answer of each prompt with its score (`groups.jsonl`, GRPO's groups)
    train    - DPO on the pairs -> adapter k (`init: previous` continues adapter k-1, `base` starts fresh)
    eval     - policy k answers the held-out prompts (greedy by default), scored by the same judge

Every phase writes into `round_<k>/`, and `manifest.json` records each phase's status, config hash, timings,
summary and output checksum (atomically, after every phase). Failure semantics: a killed run, re-run with the
same command, skips the phases the manifest marks done and resumes the one in flight through that stage's own
resume (generation and judging by id, training from its last complete checkpoint). A round's phase never reads
another round's in-flight outputs, and round k+1 starts only after round k is done. Changing the loop config
(except `rounds`, which may grow) is refused with the changed keys named.

API spend (openai-backend stages, prefloop/budget.py) is in each phase's summary and the manifest's `api_usage`;
`max_budget_usd` covers every stage of every round (a stage counts what the others spent, from their summaries) and
a phase it stops is `budget_exceeded`, resumed by re-running with a higher budget.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefloop import __version__
from prefloop.budget import check_budget, in_run, load_prices, spent_in, summarize, summary_files, usage_of
from prefloop.config import ConfigError, config_hash, field, from_dict, hashed_dict, to_dict
from prefloop.errors import BudgetExceeded, StageFailed
from prefloop.gen import resolve_backend
from prefloop.gen.stage import GenerateConfig
from prefloop.gen.stage import run as generate
from prefloop.judge import uses_generator
from prefloop.judge.pairs import PairsConfig
from prefloop.judge.stage import JudgeConfig
from prefloop.judge.stage import run as judge
from prefloop.lock import exclusive
from prefloop.pool import decontaminate_pool, dedup_pool, draw_round
from prefloop.records import load_prompts
from prefloop.rows import export_config, pairs_phase, rows_file
from prefloop.runstate import StageRun, read_summary
from prefloop.scoring import eval_summary, fixed_costs, judge_vs_gold, mean_length, pairwise_eval
from prefloop.store import atomic_write_json

log = logging.getLogger(__name__)


@dataclass
class LoopConfig:
    out: str = field(help="Run directory (manifest, config, one folder per round, report).", hash=False)
    model: str = field(help="Initial policy: a model directory (or hub id) — the base every adapter sits on.")
    prompts: str = field(help="Pool of training prompts; each round draws `prompts_per_round` from it.")
    eval_prompts: str | None = field(None, help="Held-out prompts scored after every round (recommended).")
    rounds: int = field(3, help="Training rounds after the round-0 baseline (may be raised to extend a run).",
                        hash=False)
    prompts_per_round: int | None = field(None, help="Prompts drawn per round (default: the whole pool).")
    init: str = field("previous", help="Round k trains from: previous (adapter k-1) or base (a fresh adapter).")
    data: str = field("fresh", help="Train on: fresh (this round's pairs) or accumulate (all rounds' pairs).")
    reference: str = field("initial", help="DPO reference: initial (the base) or previous (policy k-1).")
    seed: int = field(0, help="Seed for prompt draws, sampling and training.")
    gen: dict = field({}, help="Generate-stage settings (see `prefloop generate --help`), e.g. {n: 8}.")
    judge: dict = field({}, help="Judge-stage settings (see `prefloop judge --help`).")
    pairs: dict = field({}, help="Pair-selection settings (see `prefloop pairs --help`).")
    train: dict = field({}, help="Train-stage settings (see `prefloop train --help`).")
    kto_threshold: float | None = field(
        None, help="With train.method kto: train on every usable answer of the prompts whose answers score on both "
        "sides of this, each labelled desirable when its score >= it (`prefloop export --format kto --threshold`), "
        "instead of on the pairs' two answers. Empty: the pairs.")
    export: dict = field({}, help="With train.method grpo or kto_threshold: settings of the export that builds the "
                         "training rows (see `prefloop export --help`), e.g. {keep_equal_rewards: true}.")
    eval: dict = field(
        {"temperature": 0.0, "n": 1}, help="Generation settings for held-out eval (default greedy, one answer)."
    )
    eval_judge: dict = field({}, help="Judge settings for held-out eval, over `judge`'s (default: the same judge).")
    decontaminate: dict = field(
        {}, help="Training prompts matching an eval prompt are always removed from the pool (prefloop/hygiene.py); "
        "settings: {ngram_threshold: 0.5, near_threshold: 0.8, benchmarks: [FILE, ...]} (benchmark prompts are "
        "removed too).")
    gold_judge: dict = field(
        {}, help="A judge you trust (e.g. {judge: python, reward_fn: verify.py:correct}) run on every round's "
        "candidates beside `judge`: the judge phase's summary and the report then give `prefloop judge-eval` of "
        "the judge against it (accuracy, Cohen's kappa, ties, position and length bias). Empty: off.")
    dedup: dict = field(
        {}, help="Repeated prompts (prefloop/hygiene.py): {near_threshold: 0.9} removes pool prompts that repeat an "
        "earlier one (equal after normalization, or word 3-gram Jaccard >= the threshold) before any round; off by "
        "default, because prompts that differ in one number (a constraint's value) are different tasks. "
        "{fresh_prompts: true}: a round draws only prompts no earlier round drew, until the pool runs out. Every "
        "round's prompts phase counts the prompts an earlier round drew (`repeated_prompts`).")
    prices: Any = field(None, help="USD per million tokens per model for stages on the openai backend (their "
                        "usage is priced in the summaries, manifest and report): a YAML/JSON file or a mapping "
                        "{MODEL: {input_per_mtok: USD, output_per_mtok: USD}}. No built-in prices.", hash=False)
    max_budget_usd: float | None = field(
        None, help="Stop the run cleanly once its openai-backend stages, over all rounds, could spend more than "
        "this many USD (needs prices for their models); raise it and re-run to resume.", hash=False)
    dry_run: bool = field(False, hash=False, help="Check the config and the prompt files and print what the run "
                          "would do (pool after cleaning, samples per round, resume point); load and write nothing.")
    train_launcher: dict = field(
        {}, hash=False,
        help="Run the train phase under `accelerate launch` (gen/judge stay here), e.g. {num_processes: 2, "
             "config_file: examples/accelerate/ddp.yaml}; keys in prefloop/train/launch.py. Global batch = "
             "train.batch_size x processes x train.grad_accum. Empty: train in this process.")

    def __post_init__(self) -> None:
        unknown = set(self.decontaminate) - {"ngram_threshold", "near_threshold", "benchmarks"}
        if unknown:
            raise ConfigError(f"decontaminate: unknown keys {sorted(unknown)}. Fix: use ngram_threshold, "
                              "near_threshold, benchmarks.")
        unknown = set(self.dedup) - {"near_threshold", "fresh_prompts"}
        if unknown:
            raise ConfigError(f"dedup: unknown keys {sorted(unknown)}. Fix: use near_threshold, fresh_prompts.")
        near = self.dedup.get("near_threshold")
        if near is not None and not (isinstance(near, int | float) and 0 < near <= 1):
            raise ConfigError(f"dedup.near_threshold = {near!r}. Fix: a Jaccard similarity in (0, 1], e.g. 0.9.")
        if self.init not in ("previous", "base"):
            raise ConfigError(f"init = {self.init!r}. Fix: use `previous` or `base`.")
        if self.data not in ("fresh", "accumulate"):
            raise ConfigError(f"data = {self.data!r}. Fix: use `fresh` or `accumulate`.")
        if self.reference not in ("initial", "previous"):
            raise ConfigError(f"reference = {self.reference!r}. Fix: use `initial` or `previous`.")
        if self.init == "base" and self.reference == "previous":
            raise ConfigError("init: base with reference: previous is not supported. Fix: use init: previous.")
        if not self.lora and self.init == "previous" and self.reference == "initial":
            # Full fine-tuning references a frozen copy of the model it starts from, i.e. the previous policy.
            raise ConfigError(
                "train.lora: false with init: previous gives reference: previous (TRL copies the starting model). "
                "Fix: set reference: previous, or keep LoRA (whose reference is the base with the adapter off)."
            )
        if self.kto_threshold is not None and self.train.get("method") != "kto":
            raise ConfigError("kto_threshold labels answers for KTO. Fix: set train.method: kto, or drop it.")
        if self.train.get("method") == "grpo" and self.data == "accumulate":
            raise ConfigError("train.method grpo trains on each round's own samples (GRPO's groups are on-policy). "
                              "Fix: set data: fresh, or choose another method.")
        if self.train.get("carry_optimizer") and self.init == "base":
            raise ConfigError("train.carry_optimizer carries AdamW's moments into the adapter a round continues; "
                              "init: base starts a fresh one each round. Fix: set init: previous, or drop it.")
        if self.rounds < 0:
            raise ConfigError("rounds must be >= 0.")
        # Fail on a bad stage key now, not three rounds in.
        self.stage_config("generate", 1, self.gen)
        self.stage_config("judge", 1, {})
        self.stage_config("pairs", 1, {})
        if rows_file(self) != "pairs.jsonl" or self.export:
            export_config(self, Path(self.out) / "round_001")
        self.stage_config("train", 1, {})
        if self.train_launcher:
            from prefloop.train.launch import launch_config

            launch_config(self.train_launcher)
        self.stage_config("generate", 1, self.eval_gen)
        if self.gold_judge:
            try:
                from_dict(JudgeConfig, {"candidates": "c.jsonl", "out": "gold_judgments.jsonl", **self.gold_judge},
                          "loop config `gold_judge`")
            except ConfigError as e:
                raise ConfigError(str(e) if "gold_judge" in str(e) else f"loop config `gold_judge`: {e}") from None
        evaluator = self.stage_config("judge", 1, self.eval_judge)
        api = any(self._api(stage, values) for stage, values in (
            ("generate", self.gen), ("generate", self.eval_gen), ("judge", self.judge),
            ("judge", self.eval_judging)))
        check_budget(self.max_budget_usd, self.prices, [], api, "loop")  # the stages check their models' prices
        if self.eval_prompts and evaluator.judge != "ensemble" and evaluator.options().rewrites():
            raise ConfigError(
                "held-out eval cannot use a constitutional reviser (it rewrites answers, it does not score them). "
                "Fix: set eval_judge, e.g. {judge: constitutional, mode: feedback} or {judge: reward_model, ...}."
            )

    # The stage settings the loop derives, resolved in one place: held-out sampling inherits `gen`, held-out judging
    # inherits `judge`, and LoRA is on unless `train: {lora: false}`.
    @property
    def eval_gen(self) -> dict[str, Any]:
        return {**self.gen, **self.eval}

    @property
    def eval_judging(self) -> dict[str, Any]:
        return {**self.judge, **self.eval_judge}

    @property
    def lora(self) -> bool:
        return bool(self.train.get("lora", True))

    def stage_config(self, stage: str, k: int, settings: dict[str, Any], **paths: Any) -> Any:
        """The dataclass config of `stage` in round `k`: the loop's settings plus the round's paths."""
        d = Path(self.out) / f"round_{k:03d}"
        if stage == "generate":
            if self.lora and "max_lora_rank" not in settings and not settings.get("merge_adapter"):
                # vllm builds its engine once, with room for every round's adapter (ignored by other backends).
                settings = {**settings, "max_lora_rank": self.stage_config("train", k, {}).lora_r}
            values = {"model": self.model, "prompts": str(d / "prompts.jsonl"), "out": str(d / "candidates.jsonl"),
                      "round": k, "seed": self.seed + k, **settings, **paths}
            return from_dict(GenerateConfig, self._spend(stage, values), f"loop config `gen`/`eval` (round {k})")
        if stage == "judge":
            values = {"candidates": str(d / "candidates.jsonl"), "out": str(d / "judgments.jsonl"),
                      **self.judge, **settings, **paths}
            return from_dict(JudgeConfig, self._spend(stage, values), f"loop config `judge` (round {k})")
        if stage == "pairs":
            values = {"judgments": str(d / "judgments.jsonl"), "out": str(d / "pairs.jsonl"), "round": k,
                      "seed": self.seed + k, **self.pairs, **settings, **paths}
            return from_dict(PairsConfig, values, f"loop config `pairs` (round {k})")
        if stage == "train":
            from prefloop.train.dpo import TrainConfig

            values = {"model": self.model, "pairs": str(d / "pairs.jsonl"), "out": str(d / "train"),
                      "reference": self.reference, "seed": self.seed + k, **self.train, **settings, **paths}
            if values.get("method") == "grpo" and "temperature" not in self.train:  # GRPO's log-probs at the sampling T
                values["temperature"] = self.gen.get("temperature", GenerateConfig.temperature)
            return from_dict(TrainConfig, values, f"loop config `train` (round {k})")
        raise ValueError(stage)

    @staticmethod
    def _api(stage: str, values: dict[str, Any]) -> bool:
        """Whether a generate or judge stage with these settings sends API requests (the openai backend)."""
        if stage == "generate":
            return values.get("backend") == "openai"
        return uses_generator(values.get("judge")) and values.get("judge_backend") == "openai"

    def _spend(self, stage: str, values: dict[str, Any]) -> dict[str, Any]:
        """An API stage's settings with the loop's prices and budget, and what the run's other stages spent."""
        return in_run(values, self.prices, self.max_budget_usd, self.out) if self._api(stage, values) else values


def _sha256(path: Path) -> str | None:
    if not path.is_file():
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class Policy:
    """What samples in a round: the base `model` with a LoRA `adapter` on it, or (full fine-tuning) a whole model
    and no adapter. The manifest records it as {"model", "adapter"}; `settings()` are the keys every stage reads."""

    model: str
    adapter: str | None = None

    def settings(self) -> dict[str, Any]:
        return {"model": self.model, "adapter": self.adapter}


class Manifest:
    """`manifest.json`: the loop's record of what ran. Rewritten atomically after every phase transition."""

    def __init__(self, config: LoopConfig):
        self.path = Path(config.out) / "manifest.json"
        self.root = Path(config.out)
        self.prices, self.max_budget_usd = config.prices, config.max_budget_usd
        if self.path.exists():
            self.data = json.loads(self.path.read_text(encoding="utf-8"))
        else:
            self.data = {"prefloop_version": __version__, "config_hash": config_hash(hashed_dict(config)),
                         "config": to_dict(config), "status": "running", "rounds": []}
        self.data["config"]["rounds"] = config.rounds

    def round(self, k: int, policy: Policy) -> dict[str, Any]:
        while len(self.data["rounds"]) <= k:
            self.data["rounds"].append({"round": len(self.data["rounds"]), "phases": {}})
        entry = self.data["rounds"][k]
        entry["policy"] = policy.settings()
        return entry

    def phase_done(self, k: int, phase: str) -> bool:
        rounds = self.data["rounds"]
        return k < len(rounds) and rounds[k]["phases"].get(phase, {}).get("status") == "done"

    def start(self, k: int, phase: str) -> float:
        self.data["rounds"][k]["phases"][phase] = {"status": "running"}
        self.save()
        return time.time()

    def done(self, k: int, phase: str, started: float, output: Path | None, summary: dict[str, Any]) -> None:
        entry = {"status": "done", "seconds": round(time.time() - started, 3), "summary": summary}
        if output is not None:
            entry["output"] = str(output.relative_to(self.root)) if output.is_relative_to(self.root) else str(output)
            entry["sha256"] = _sha256(output)
        self.data["rounds"][k]["phases"][phase] = entry
        self.save()

    def save(self) -> None:
        self.data["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        prices = load_prices(self.prices)
        counts, spent = spent_in(summary_files(self.root), prices)
        if counts:  # the whole run's API spend, phases in flight included: what max_budget_usd is checked against
            self.data["api_usage"] = {**summarize(counts, prices), "spent_usd_max": round(spent, 8),
                                      "max_budget_usd": self.max_budget_usd}
        atomic_write_json(self.path, self.data)


def _phase(manifest: Manifest, k: int, name: str, fn) -> None:
    """Run one phase unless the manifest says it is done; `fn() -> (output file or None, summary)`.

    An exception marks the phase `failed` with its message (the report shows it) and propagates; a re-run retries
    the phase. A SIGKILL leaves it `running`, which a re-run treats the same way.
    """
    if manifest.phase_done(k, name):
        return
    started = manifest.start(k, name)
    log.info("round %d: %s", k, name)
    try:
        output, summary = fn()
    except Exception as e:
        status = "budget_exceeded" if isinstance(e, BudgetExceeded) else "failed"  # resumable with a higher budget
        manifest.data["rounds"][k]["phases"][name] = {"status": status, "error": f"{type(e).__name__}: {e}"}
        manifest.data["status"] = status
        manifest.save()
        raise
    manifest.done(k, name, started, output, summary)


def _judge_settings(config: LoopConfig, policy: Policy, settings: dict[str, Any]) -> dict[str, Any]:
    """`judge_model: policy` (self-rewarding) -> the given policy's model and adapter judge."""
    if {**config.judge, **settings}.get("judge_model") != "policy":
        return settings
    return {**settings, "judge_model": policy.model, "judge_adapter": policy.adapter}


def _evaluate(config: LoopConfig, manifest: Manifest, k: int, policy: Policy, round_dir: Path) -> None:
    if not config.eval_prompts:
        return

    def phase():
        settings = {**config.eval_gen, **policy.settings(), "prompts": config.eval_prompts,
                    "out": str(round_dir / "eval_candidates.jsonl"), "seed": config.seed}
        gen_cfg = config.stage_config("generate", k, settings)
        candidates = generate(gen_cfg)
        # A self-rewarding judge scores the held-out answers as the initial model: one fixed judge for every round.
        initial = Policy(config.model)
        judge_cfg = config.stage_config("judge", k, _judge_settings(config, initial, {
            **config.eval_judge, "candidates": str(candidates), "out": str(round_dir / "eval_judgments.jsonl")}))
        if judge_cfg.judge != "ensemble" and judge_cfg.options().pairwise():
            judgments, summary = pairwise_eval(config, judge_cfg, k, candidates, round_dir)
        else:
            judgments = judge(judge_cfg)
            summary = eval_summary(judgments)
        loads = [read_summary(path).get("load_s") for path in (candidates, judgments)]
        return judgments, {**summary, **usage_of([candidates, judgments], config.prices),
                           "load_s": round(sum(s for s in loads if s), 3)}

    _phase(manifest, k, "eval", phase)


def _generate_phase(config: LoopConfig, k: int, policy: Policy):
    out = generate(config.stage_config("generate", k, {**config.gen, **policy.settings()}))
    summary = read_summary(out)
    if summary.get("status") != "done":
        raise StageFailed(f"round {k}: generate ended {summary.get('status')} ({summary.get('failed')} of "
                          f"{summary.get('prompts')} prompts failed). Fix: see {out.with_suffix('.summary.json')} "
                          "and the log; re-run the same command to retry the failed prompts.")
    return out, {**summary, "mean_length": mean_length(out)}


def _judge_phase(config: LoopConfig, k: int, policy: Policy):
    out = judge(config.stage_config("judge", k, _judge_settings(config, policy, {})))
    summary = read_summary(out)
    if config.gold_judge:
        summary = {**summary, "judge_eval": judge_vs_gold(config, k, out)}
    return out, summary


def _train_phase(config: LoopConfig, k: int, d: Path, policy: Policy):
    from prefloop.train.dpo import run as train

    if _uses_vllm(config):  # on a GPU, the engine gives its memory back for training
        from prefloop.gen.vllm import yield_accelerator

        yield_accelerator()

    pairs_file = d / ("train_pairs.jsonl" if config.data == "accumulate" else rows_file(config))
    # LoRA: the base stays `config.model` and the policy is its adapter. Full fine-tuning: the policy is a model.
    start = policy if config.init == "previous" else Policy(config.model)
    train_cfg = config.stage_config("train", k, {"pairs": str(pairs_file), **start.settings()})
    if config.train_launcher:  # the same config and output dir, trained by `accelerate launch`ed ranks
        from prefloop.train.launch import launch_config, launch_train

        out = launch_train(train_cfg, launch_config(config.train_launcher))
    else:
        out = Path(train(train_cfg))
    summary_path = out / "train_summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    return None, summary  # a directory: no single-file checksum


def _round(config: LoopConfig, manifest: Manifest, pool: list[dict[str, Any]], k: int, policy: Policy) -> Policy:
    """Run (or resume) round k, sampling from `policy`; return the policy it trains."""
    d = Path(config.out) / f"round_{k:03d}"
    manifest.round(k, policy)
    _phase(manifest, k, "prompts", lambda: draw_round(config, pool, k, d))
    _phase(manifest, k, "generate", lambda: _generate_phase(config, k, policy))
    _phase(manifest, k, "judge", lambda: _judge_phase(config, k, policy))
    _phase(manifest, k, "pairs", lambda: pairs_phase(config, k, d))
    _phase(manifest, k, "train", lambda: _train_phase(config, k, d, policy))
    trained = Policy(config.model, str(d / "train" / "adapter")) if config.lora else Policy(str(d / "train" / "model"))
    manifest.data["rounds"][k]["trained_policy"] = trained.settings()
    _evaluate(config, manifest, k, trained, d)
    manifest.data["rounds"][k]["fixed_s"] = fixed_costs(manifest.data["rounds"][k])
    manifest.save()
    return trained


def _uses_vllm(config: LoopConfig) -> bool:
    backends = [s.get("backend", "hf") for s in (config.gen, config.eval_gen)]
    for judge_settings in (config.judge, config.eval_judging):
        if uses_generator(judge_settings.get("judge")):
            backends.append(judge_settings.get("judge_backend", "hf"))
    return any(resolve_backend(b) == "vllm" for b in backends)


def engine_scope(config: LoopConfig):
    """With vLLM, one engine serves every round (each round's adapter is a `LoRARequest`); else nothing to keep."""
    if not _uses_vllm(config):
        return contextlib.nullcontext()
    from prefloop.gen.vllm import keep_engine

    return keep_engine()


def _ray_scope(config: LoopConfig):
    """Phases on `engine: ray` (set per phase: `gen: {engine: ray, ray_actors: 4}`, `judge: {engine: ray}`; eval
    inherits `gen`'s and `judge`'s) share one Ray connection for the whole run instead of one per phase."""
    phases = [config.gen, config.eval_gen, config.judge, config.eval_judging]
    from prefloop.engine import RAY_ENGINES
    from prefloop.ray_engine import ray_session

    ray_phases = [s for s in phases if s.get("engine") in RAY_ENGINES]
    if not ray_phases:
        return contextlib.nullcontext()

    return ray_session(next((s["ray_address"] for s in ray_phases if s.get("ray_address")), None))


def run(config: LoopConfig) -> Path | str:
    """Run (or resume) the loop in `config.out`; return the run directory (with `dry_run`, the plan's text: see
    prefloop/plan.py). See module docstring."""
    if config.dry_run:
        from prefloop.plan import plan

        return plan(config)
    return _run(config)


@exclusive
def _run(config: LoopConfig) -> Path:
    root = Path(config.out)
    StageRun("loop", root, config, directory=True).begin()  # writes config.yaml; refuses a changed config
    pool = load_prompts(config.prompts).records  # validated whole before any model loads
    pool, repeated = dedup_pool(config, pool)
    pool, cleaned = decontaminate_pool(config, pool)
    if repeated:
        cleaned = {**cleaned, "dedup": repeated}
    with engine_scope(config), _ray_scope(config):
        return _run_rounds(config, pool, cleaned)


def _run_rounds(config: LoopConfig, pool: list[dict[str, Any]], cleaned: dict[str, Any]) -> Path:
    from prefloop.report import write_report

    root = Path(config.out)
    manifest = Manifest(config)
    manifest.data["status"] = "running"
    manifest.data["decontamination"] = cleaned

    policy = Policy(config.model)
    manifest.round(0, policy)
    manifest.save()  # (with no eval_prompts nothing else writes it before the report reads it)
    _evaluate(config, manifest, 0, policy, root / "round_000")
    write_report(root)
    for k in range(1, config.rounds + 1):
        try:
            policy = _round(config, manifest, pool, k, policy)
        except Exception:
            write_report(root)  # the report then shows the failed phase and the numbers that explain it
            raise
        manifest.save()
        write_report(root)

    manifest.data["status"] = "done"
    manifest.save()
    write_report(root)
    return root
