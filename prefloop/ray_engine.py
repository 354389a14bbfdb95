"""Ray Data as the engine of `generate` and `judge`: prefloop's own Generator/Judge as actors, prefloop's store.

    pip install "prefloop[ray]"
    prefloop generate --model M --prompts p.jsonl --out c.jsonl --engine ray --ray-actors 4 --ray-num-gpus 1
    prefloop judge --candidates c.jsonl --out j.jsonl --judge python --reward-fn f.py:fn --engine ray
    RAY_ADDRESS=ray://head:10001 prefloop generate ... --engine ray     # an existing cluster (or --ray-address)

Why this shape (issue 8): users' jobs outgrow one box, and they already run Ray for batch inference; prefloop
schedules nothing itself. The driver (this process) reads the input, drops the ids already on disk, and builds a
Ray Data dataset of the PENDING rows only. `map_batches` runs an actor class that builds prefloop's own
`Generator` (or `Judge`) once in `__init__` from the stage config (one model load per actor; `ray_actors` replicas,
`ray_num_cpus`/`ray_num_gpus` each) and turns one batch into results. The driver consumes the results as they
stream in and appends them through the same `JsonlStore` the local engine uses, one fsynced commit per batch.

Driver-side writing, not per-actor shard files: a candidates row is a few KB while producing it costs a model call,
so one writer is far from the bottleneck (bench/scale.py), and the store's guarantees (every id exactly once,
torn-tail repair, byte-for-byte resume) stay the store's, with no merge step that could itself be interrupted.

Failure semantics: a killed driver loses the batches in flight (produced by actors but not yet written); the ids
already written are kept byte-for-byte, and a re-run with the same command (on either engine: `engine` is not part
of the config hash) submits only the missing ids. An actor that dies is restarted by Ray Data; a batch whose actor
raised fails the stage after the batches already written were committed. Prompts too long for the context are
found by each actor for its own batch (the driver holds no model): without `skip_too_long` the stage stops at the
first one, naming it, with the rows finished before it kept; with it, they are skipped and counted.

Paths in the config (model, adapter, reward_fn) are read by the actors: on a local cluster they resolve from the
driver's working directory (each actor changes into it); on a multi-node cluster they must exist on every node
(a shared filesystem or a baked image), see docs/scaling.md.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

from prefloop.config import ConfigError
from prefloop.gen.executor import Finished, prompt_seed

log = logging.getLogger(__name__)


def _import_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as e:
        raise ConfigError(
            f"--engine ray needs Ray Data, which does not import here ({e}). Fix: pip install 'prefloop[ray]' "
            "(or pip install 'ray[data]'), or use --engine local."
        ) from None
    return ray


@contextlib.contextmanager
def ray_session(address: str | None, num_cpus: int | None = None):
    """Connect to `address` (else $RAY_ADDRESS, else start a local cluster); yield `(ray, info)`.

    An already initialised Ray (a notebook, a test's shared cluster) is used as is and left running; a cluster
    this function connected to or started is shut down on exit (a local one dies with it).
    """
    ray = _import_ray()
    started = time.time()
    owned = not ray.is_initialized()
    if owned:
        address = address or os.environ.get("RAY_ADDRESS") or None
        kwargs: dict[str, Any] = {"address": address, "log_to_driver": True, "include_dashboard": False}
        if address is None and num_cpus:
            kwargs["num_cpus"] = num_cpus
        log.info("ray: %s", f"connecting to {address}" if address else "starting a local cluster")
        ray.init(**kwargs)
    info = {"address": address or "local", "startup_s": round(time.time() - started, 3),
            "cluster_cpus": ray.cluster_resources().get("CPU", 0),
            "cluster_gpus": ray.cluster_resources().get("GPU", 0)}
    # prefloop draws its own progress bar (rows written); Ray Data's bars would interleave with it.
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        yield ray, info
    finally:
        if owned:
            ray.shutdown()


def check_fits(config: Any, info: dict[str, Any]) -> None:
    """Refuse a request the cluster can never satisfy; otherwise Ray waits for resources forever."""
    need_cpus, need_gpus = config.ray_actors * config.ray_num_cpus, config.ray_actors * config.ray_num_gpus
    if need_gpus > info["cluster_gpus"] or need_cpus > info["cluster_cpus"]:
        raise ConfigError(
            f"--engine ray: {config.ray_actors} actors x (num_cpus={config.ray_num_cpus}, "
            f"num_gpus={config.ray_num_gpus}) need {need_cpus:g} CPUs and {need_gpus:g} GPUs, but the cluster at "
            f"{info['address']} has {info['cluster_cpus']:g} CPUs and {info['cluster_gpus']:g} GPUs. Fix: lower "
            "--ray-actors or the per-actor --ray-num-cpus/--ray-num-gpus, or add nodes."
        )


def engine_summary(config: Any, info: dict[str, Any]) -> dict[str, Any]:
    """The summary's `engine` and `ray` keys."""
    return {"engine": config.engine, "ray": {"address": info["address"], "actors": config.ray_actors,
                                     "num_cpus": config.ray_num_cpus, "num_gpus": config.ray_num_gpus,
                                     "batch_size": config.ray_batch_size, "startup_s": info["startup_s"]}}


def _pipeline(ray, rows: list[dict[str, Any]], actor: type, config: Any, cwd: str):
    """The Ray Data dataset: pending rows (JSON text, so any prompt shape crosses Arrow) -> actor results.

    Rows travel as JSON strings: prompts are strings or message lists and carry arbitrary extra columns, which
    Arrow would have to unify into one schema; text needs none, and the driver writes what it parsed anyway.
    """
    items = [{"id": r["id"], "row": json.dumps(r, ensure_ascii=False)} for r in rows]
    return dataset(ray, items, config.ray_batch_size).map_batches(
        actor,
        batch_size=config.ray_batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=config.ray_actors),
        num_cpus=config.ray_num_cpus,
        num_gpus=config.ray_num_gpus or None,
        fn_constructor_kwargs={"config": config, "cwd": cwd},
    )


def dataset(ray, items: list[dict[str, Any]], batch_size: int):
    """A Ray dataset of `items` in one block per batch: every actor gets work, no batch waits on one huge block."""
    return ray.data.from_items(items, override_num_blocks=max(1, min(len(items), -(-len(items) // batch_size))))


def _enter(cwd: str) -> None:
    """Resolve the config's relative paths as the driver did (local cluster / shared filesystem)."""
    if os.path.isdir(cwd):
        os.chdir(cwd)


# ---------------------------------------------------------------------------------------------------- generate


class GenerateActor:
    """One replica: loads prefloop's Generator once; each call generates one batch (seeded like a local chunk)."""

    def __init__(self, config: Any, cwd: str) -> None:
        from prefloop.gen import load_generator, resolve_backend

        _enter(cwd)
        self.config = config
        backend = resolve_backend(config.backend)
        self.generator = load_generator(backend, config.model, config.adapter, **config.backend_options(backend))

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        from prefloop.gen import GenerationAborted, encode_prompt
        from prefloop.records import chat_template_kwargs

        rows = [json.loads(r) for r in batch["row"]]
        kwargs = [chat_template_kwargs(r, self.config.chat_template_kwargs) for r in rows]
        status = ["ok"] * len(rows)
        detail = [""] * len(rows)
        tokenizer, context = getattr(self.generator, "tokenizer", None), getattr(self.generator, "max_context", 0)
        if tokenizer is not None and context:
            for i, r in enumerate(rows):
                length = len(encode_prompt(tokenizer, r["prompt"], self.generator.name, kwargs[i]))
                if length > context - self.config.max_new_tokens:
                    status[i], detail[i] = "too_long", json.dumps([length, context])
        todo = [i for i, s in enumerate(status) if s == "ok"]
        results: list = [None] * len(rows)
        if todo:
            sampling = self.config.sampling
            # Each prompt's own seed, as on the local engine: the same samples whatever the batch.
            sampling.seeds = [prompt_seed(self.config.seed, rows[i]["id"]) for i in todo]
            sampling.chat_template_kwargs = [kwargs[i] for i in todo]
            try:
                out = self.generator.generate([rows[i]["prompt"] for i in todo], self.config.n, sampling)
            except GenerationAborted as e:  # keep what finished; the driver writes it, then stops the stage
                out = e.partial
                for i in todo:
                    detail[i] = str(e)
                status = ["aborted" if s == "ok" else s for s in status]
            for i, completions in zip(todo, out, strict=True):
                results[i] = completions
        for i, completions in enumerate(results):
            if status[i] == "ok" and completions is None:
                status[i] = "failed"
        return {
            "id": [r["id"] for r in rows],
            "completions": [json.dumps(c) if c is not None else "" for c in results],
            "status": status,
            "detail": detail,
            "model": [self.generator.name] * len(rows),
        }

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.generator.close()


class RayGenerate:
    """The `--engine ray` executor of `prefloop generate` (gen/stage.py drives it; see this module's docstring):
    finished batches from `GenerateActor`s, in the order Ray finishes them."""

    def __init__(self, config: Any, loaded: Any, meter: Any = None) -> None:
        self.config = config
        self.info: dict[str, Any] = {"address": None, "startup_s": 0.0}

    @staticmethod
    def check(config: Any) -> None:
        pass

    def start(self, todo: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
        return todo, []  # the actors hold the model: each finds the too-long prompts of its own batch

    def batches(self, todo: list[dict[str, Any]]) -> Iterator[Finished]:
        with ray_session(self.config.ray_address) as (ray, self.info):
            check_fits(self.config, self.info)
            ds = _pipeline(ray, todo, GenerateActor, self.config, os.getcwd())
            by_id = {p["id"]: p for p in todo}
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                yield _finished(batch, by_id)

    def summary(self) -> dict[str, Any]:
        return engine_summary(self.config, self.info)

    def close(self) -> None:
        pass


def _finished(batch: dict[str, Any], by_id: dict[str, dict[str, Any]]) -> Finished:
    """One actor batch as the driver reads it. A prompt cut off by an abort is not a row (nor a failure)."""
    out = Finished([], "")
    for rid, completions, status, detail, model in zip(batch["id"], batch["completions"], batch["status"],
                                                       batch["detail"], batch["model"], strict=True):
        prompt = by_id[str(rid)]
        out.model = str(model)
        if status == "too_long":
            length, context = json.loads(detail)
            out.too_long.append((prompt, length, context))
        elif status == "aborted" and not completions:
            out.aborted = out.aborted or str(detail)
        elif not completions:  # failed: not written, so a re-run retries it
            out.rows.append((prompt, None))
        else:
            completions = json.loads(completions)
            out.tokens += sum(c["num_tokens"] or 0 for c in completions)
            out.rows.append((prompt, completions))
    return out


# ---------------------------------------------------------------------------------------------------- judge


class JudgeActor:
    """One replica: loads prefloop's Judge once (`JudgeConfig.load_judge`); each call judges one batch."""

    def __init__(self, config: Any, cwd: str) -> None:
        _enter(cwd)
        self.judge = config.load_judge()

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        rows = [json.loads(r) for r in batch["row"]]
        verdicts = self.judge.judge(rows)
        return {"id": [r["id"] for r in rows],
                "verdict": [json.dumps(v, ensure_ascii=False) for v in verdicts],
                "judge": [json.dumps({"name": self.judge.name, "info": getattr(self.judge, "info", None)})]
                * len(rows)}

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.judge.close()


class RayJudges:
    """The `--engine ray` executor of `prefloop judge` (judge/stage.py drives it): batches of (row, verdict, judge)
    from `JudgeActor`s, in the order Ray finishes them."""

    def __init__(self, config: Any, judge: Any = None, meter: Any = None) -> None:
        self.config = config
        self.info: dict[str, Any] = {"address": None, "startup_s": 0.0}

    def batches(self, todo: list[dict[str, Any]]) -> Iterator[list[tuple[dict[str, Any], dict[str, Any], Any]]]:
        if not todo:
            return
        with ray_session(self.config.ray_address) as (ray, self.info):
            check_fits(self.config, self.info)
            ds = _pipeline(ray, todo, JudgeActor, self.config, os.getcwd())
            by_id = {r["id"]: r for r in todo}
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                out = []
                for rid, verdict, who in zip(batch["id"], batch["verdict"], batch["judge"], strict=True):
                    who = json.loads(who)
                    out.append((by_id[str(rid)], json.loads(verdict), SimpleNamespace(name=who["name"],
                                                                                      info=who["info"])))
                yield out

    def summary(self) -> dict[str, Any]:
        return engine_summary(self.config, self.info)

    def close(self) -> None:
        pass
