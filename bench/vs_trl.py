"""prefloop's loop against what a user would run instead, at equal training wall time: TRL's `GRPOTrainer`, TRL's
`OnlineDPOTrainer`, and offline DPO on one large batch.

    python bench/vs_trl.py                         # the addition demo task, 180 s of training per run
    python bench/vs_trl.py --quick                 # smoke check of every side (~5 min): weak base, 15 s per run
    python bench/vs_trl.py --task instructions     # SmolLM2-135M-Instruct on verifiable instructions (hours)
    python bench/vs_trl.py --runs prefloop,grpo    # some sides only (names: prefloop, offline, grpo, online-dpo,
                                                   # online-dpo-ipo; a run is `side` or `side@lr`)
    python bench/vs_trl.py --base DIR --runs prefloop --variant prompts_per_round=4096 --variant train.epochs=2
                                                   # the loop with demo settings changed, beside the demo's own
    python bench/vs_trl_report.py bench/results/vs_trl.json    # re-render a results file's table and PNG

Every run starts from the SAME base model, draws prompts from the same training pool, is rewarded by the same python
verifier (prefloop's `python` judge function, passed to TRL as `reward_funcs`: the signatures are the same), and is
scored by the same greedy evaluation on the same held-out prompts. Runs go one after the other, never together.

Runs
  prefloop          `prefloop.loop.run` with the task's demo settings, unchanged, one round at a time until the budget
                    is spent; each round's adapter is evaluated after it. It generates on the demo's backend: hf for
                    addition, `auto` for instructions (vLLM where it imports, as `prefloop demo --task instructions`).
                    (bench/results/vs_trl.json's row ran the addition demo's settings before this benchmark changed
                    them: 2,048 prompts per round; the settings it chose are the `prompts_per_round=9000` row of
                    vs_trl-variants.json.)
  prefloop K=V,...  (--variant) the same with some demo settings changed.
  offline           the same settings, but ONE round on the whole training pool (instructions: on 384 prompts, two
                    rounds' worth): every pair is sampled from the base model (offline DPO on one large batch);
                    evaluated once, when it is done.
  grpo@lr           `trl.GRPOTrainer` at its recommended settings (8 generations per prompt at T=1, the `dapo` loss,
                    beta 0, one update per generation batch), the demo's LoRA, 32 completions per step.
  online-dpo@lr     `OnlineDPOTrainer`: 2 samples per prompt from the policy itself, the verifier picks the chosen
                    one, sigmoid DPO (beta as the demo's), the demo's LoRA, 32 prompts per step.
  online-dpo-ipo@lr the same with the other loss it supports, IPO.
  The TRL runs use the demo's sampling settings (max new tokens, chat template), fp32, no gradient checkpointing,
  a constant learning rate (the budget, not a step count, ends them) and are evaluated every `--eval-every` seconds.

Time = wall seconds of training (for prefloop: generation, judging, pair building and DPO; for TRL: the trainer's
steps, its own generation included), with model builds and evaluations excluded. CPU s = process CPU seconds over the
same spans (a run that got less CPU shows it). "accuracy at t" = the accuracy of the newest checkpoint finished by t.
Seeds are fixed. Writes bench/results/vs_trl[-<task>].json and .png (held-out accuracy against training time).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
sys.path.insert(0, str(Path(__file__).parent))
RESULTS = Path(__file__).parent / "results"


class Clock:
    """Training time and CPU time, with spans (evaluations) cut out by stopping it."""

    def __init__(self):
        self.wall = self.cpu = 0.0
        self._start: tuple[float, float] | None = None

    def start(self) -> None:
        self._start = (time.perf_counter(), time.process_time())

    def stop(self) -> None:
        if self._start is not None:
            self.wall += time.perf_counter() - self._start[0]
            self.cpu += time.process_time() - self._start[1]
            self._start = None

    def now(self) -> float:
        return self.wall + (time.perf_counter() - self._start[0] if self._start else 0.0)


@dataclass
class Task:
    """What differs between the tasks: the base model, the prompts, the verifier, the evaluation and the demo's loop."""

    name: str
    base: Path
    train: list[dict]
    heldout: list[dict]
    reward: Callable[..., list[float]]  # TRL's reward-function convention, the dataset's other columns as keywords
    evaluate: Callable[[Any, Any, list[dict]], float]  # (model, tokenizer, held-out rows) -> accuracy, greedy
    loop: dict[str, Any]  # prefloop's demo settings for the task
    lrs: dict[str, list[float]]  # the learning-rate sweep per TRL side
    trl_rows: Callable[[list[dict]], list[dict]] = field(default=lambda rows: rows)  # rows as a TRL dataset takes them
    online_dpo_batch: int = 32  # OnlineDPO prompts per step (2 answers each)
    offline_prompts: int | None = None  # the offline run's one round (None: the whole pool)
    backend: str = "hf"  # the loop's generation backend, as the task's demo runs it
    # What the last evaluation's answers were like (instructions: mean tokens, share cut at the limit), for the curve.
    answers: dict[str, float] = field(default_factory=dict)

    @property
    def gen(self) -> dict[str, Any]:
        return self.loop["gen"]


def addition_task(work: Path, base: str | None, quick: bool, log) -> Task:
    from prefloop.demo.addition import DEMO
    from prefloop.demo.pretrain import accuracy, pretrain
    from prefloop.tasks.addition import make_prompts, reward, split_size

    if base is None:
        start = time.perf_counter()
        # --quick: a fixed short pretraining (the default stops at 30% probe accuracy, ~1-1.5 min).
        base = pretrain(
            work / "base", log=lambda m: None, **({"steps": 150, "stop_at_accuracy": None} if quick else {})
        )
        log(f"base model built in {time.perf_counter() - start:.0f}s")
    heldout = make_prompts(500, seed=0, split="heldout")  # the demo's held-out set (prefloop.demo.addition.HELDOUT)
    lr = DEMO["train"]["lr"]
    return Task(
        name="addition",
        base=Path(base),
        train=make_prompts(split_size("train"), seed=0, split="train"),
        heldout=heldout[:200] if quick else heldout,
        reward=reward,
        evaluate=accuracy,
        loop=DEMO,
        # Log-spaced around the demo's DPO rate; OnlineDPO one step lower (at 5e-3 and up it fell to 0% on 11-22).
        lrs={"grpo": [lr / 3, lr, lr * 3], "online-dpo": [lr / 15, lr / 5, lr / 1.5],
             "online-dpo-ipo": [lr / 15, lr / 5, lr / 1.5]},
    )


def instructions_task(work: Path, base: str | None, quick: bool, log) -> Task:
    from prefloop.demo.instructions import HELDOUT, INSTRUCTIONS, MODEL, TRAIN_POOL
    from prefloop.models import resolve_model
    from prefloop.tasks.instructions import make_prompts, reward, strict

    base = base or resolve_model(MODEL, dtype=INSTRUCTIONS["gen"]["dtype"])
    heldout = make_prompts(HELDOUT, split="heldout", seed=0)
    max_new = INSTRUCTIONS["gen"]["max_new_tokens"]

    def evaluate(model, tokenizer, rows):
        texts = greedy_chat(model, tokenizer, [r["prompt"] for r in rows], max_new, lengths := [])
        task.answers.update(mean_tokens=round(sum(lengths) / len(lengths), 1),
                            cut=round(sum(n >= max_new for n in lengths) / len(lengths), 3))
        scores = strict(None, texts, constraints=[r["constraints"] for r in rows])
        return sum(s or 0.0 for s in scores) / max(1, len(rows))

    def trl_reward(prompts, completions, constraints_json, **kwargs):
        """instructions:reward, with the constraints a JSON column (their keys differ by kind, which Arrow refuses)."""
        return reward(prompts, completions, constraints=[json.loads(c) for c in constraints_json])

    lr = INSTRUCTIONS["train"]["lr"]
    task = Task(
        name="instructions",
        base=Path(base),
        train=make_prompts(TRAIN_POOL, split="train", seed=0),
        heldout=heldout[:20] if quick else heldout,
        reward=trl_reward,
        evaluate=evaluate,
        loop=INSTRUCTIONS,
        online_dpo_batch=8,  # 16 answers of up to 160 tokens per step
        backend="auto",  # as `prefloop demo --task instructions`: vLLM where it imports (it does here), else hf
        # Not the 2,000-prompt pool: sampling it takes ~1.5 h here. One batch of the prompts the loop's rounds see in
        # about the same time (2 rounds of 192 fill ~600 s), all sampled from the base model.
        offline_prompts=2 * INSTRUCTIONS["prompts_per_round"],
        lrs={side: [lr / 3, lr, lr * 3] for side in ("grpo", "online-dpo", "online-dpo-ipo")},
        trl_rows=lambda rows: [
            {"prompt": r["prompt"], "constraints_json": json.dumps(r["constraints"])} for r in rows
        ],
    )
    return task


def greedy_chat(
    model, tokenizer, messages: list[list[dict]], max_new_tokens: int, lengths: list[int] | None = None,
    batch_size: int = 100,
) -> list[str]:
    """Greedy answers, in batches on a preallocated KV cache (transformers' StaticCache, as prefloop's hf backend
    decodes): the same tokens as the default dynamic cache, faster, so evaluations cost less of the session.
    `lengths` gets each answer's tokens before its end of sequence (`max_new_tokens` for one cut off)."""
    import torch
    from transformers import StaticCache

    texts: list[str] = []
    model.eval()
    with torch.inference_mode():
        for i in range(0, len(messages), batch_size):
            prompts = [
                tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True)
                for m in messages[i : i + batch_size]
            ]
            enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
            width = enc["input_ids"].shape[1]
            cache = StaticCache(config=model.config, max_cache_len=width + max_new_tokens)
            out = model.generate(
                **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                past_key_values=cache,
            )
            new = out[:, width:]
            texts += tokenizer.batch_decode(new, skip_special_tokens=True)
            if lengths is not None:  # generate pads a finished row with pad_token_id after its end of sequence
                ends = (new == tokenizer.eos_token_id) | (new == tokenizer.pad_token_id)
                lengths += [int(row.nonzero()[0]) if row.any() else max_new_tokens for row in ends]
    return texts


TASKS = {"addition": addition_task, "instructions": instructions_task}


def lora_config(train: dict[str, Any]):
    """The LoRA prefloop's train stage builds for these train settings (`TrainConfig`'s defaults where they say
    nothing), for the TRL runs."""
    from dataclasses import fields

    from peft import LoraConfig

    from prefloop.train.dpo import TrainConfig

    settings = {f.name: f.default for f in fields(TrainConfig)} | train
    targets = settings["lora_target_modules"]
    return LoraConfig(r=settings["lora_r"], lora_alpha=settings["lora_alpha"], lora_dropout=settings["lora_dropout"],
                      task_type="CAUSAL_LM", target_modules=targets if targets == "all-linear" else targets.split(","))


def load(path: Path, adapter: Path | None = None):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    from prefloop import attention

    attention.use_on(model, "cpu")  # the kernels the TRL runs and prefloop's stages use (same results, faster)
    return model


def override(settings: dict[str, Any], assignments: str) -> dict[str, Any]:
    """`settings` with "key=value,stage.key=value" applied (values read as JSON where they parse, else strings)."""
    out = json.loads(json.dumps(settings))
    for item in filter(None, assignments.split(",")):
        path, _, raw = item.partition("=")
        *stages, key = path.strip().split(".")
        target = out
        for stage in stages:
            target = target.setdefault(stage, {})
        try:
            target[key] = json.loads(raw)
        except json.JSONDecodeError:
            target[key] = raw
    return out


def run_prefloop(
    task: Task, work: Path, budget: float, tokenizer, log, offline: bool = False, variant: str = ""
) -> dict:
    """The task's demo loop, one round per call (the loop resumes and runs the next), until the budget is spent.
    `offline`: one round on the whole pool instead. `variant`: overrides of the demo settings ("k=v,stage.k=v")."""
    from prefloop.config import from_dict
    from prefloop.loop import LoopConfig
    from prefloop.loop import run as run_loop
    from prefloop.store import dumps

    name = "offline" if offline else f"prefloop {variant}".strip()
    settings = override(task.loop, variant)
    settings["gen"] = {"backend": task.backend, **settings.get("gen", {})}
    out, data = work / name.replace(" ", "_"), work / "data" / "train.jsonl"
    if not data.exists():  # one pool file for every loop run of the invocation
        data.parent.mkdir(exist_ok=True)
        data.write_text("".join(dumps(r) for r in task.train))
    clock, curve, rounds = Clock(), [], []
    k = 0
    while clock.wall < budget and not (offline and k == 1):
        if curve and clock.wall + curve[-1]["t"] / k > budget * 1.1:
            break  # a round as long as the mean one so far would end well past the budget, where nothing is compared
        k += 1
        # No loop eval (it would count as training time): accuracy comes from the shared evaluation below.
        values = {**settings, "out": str(out), "model": str(task.base), "prompts": str(data),
                  "eval_prompts": None, "rounds": k}
        if offline:
            values["prompts_per_round"] = task.offline_prompts or len(task.train)
        clock.start()
        run_loop(from_dict(LoopConfig, values, "bench settings"))
        clock.stop()
        acc = task.evaluate(load(task.base, out / f"round_{k:03d}" / "train" / "adapter"), tokenizer, task.heldout)
        manifest = json.loads((out / "manifest.json").read_text())
        curve.append({"t": round(clock.wall, 1), "cpu_s": round(clock.cpu, 1), "accuracy": acc, "round": k,
                      **task.answers})
        rounds.append(
            {"round": k, "phases": {p: v.get("seconds") for p, v in manifest["rounds"][k]["phases"].items()},
             "fixed_s": manifest["rounds"][k].get("fixed_s")}  # model and engine loads inside those phases
        )
        log(f"{name} round {k}: t={clock.wall:.0f}s cpu={clock.cpu:.0f}s accuracy {acc:.3f}")
    described = f"{task.name} demo settings" + (
        f", one round of {task.offline_prompts or len(task.train)} prompts" if offline else "")
    return {"name": name, "side": "offline" if offline else "prefloop",
            "settings": described + (f", with {variant}" if variant else ""), "variant": variant, "curve": curve,
            "rounds": rounds, "train_s": round(clock.wall, 1), "cpu_s": round(clock.cpu, 1)}


def trl_name(side: str, lr: float) -> str:
    return f"{side} lr={lr:.2g}"


def run_trl(task: Task, side: str, lr: float, work: Path, budget: float, eval_every: float, tokenizer, log) -> dict:
    import datasets
    from transformers import TrainerCallback

    from prefloop.train.kernels import size_lm_head_tiles

    clock, curve, next_eval = Clock(), [], [eval_every]
    name = trl_name(side, lr)

    class BudgetAndEval(TrainerCallback):
        """Evaluates every `eval_every` training seconds (clock stopped) and ends training at the budget."""

        def on_train_begin(self, args, state, control, **kwargs):
            clock.start()

        def on_step_end(self, args, state, control, model=None, **kwargs):
            t = clock.now()
            if t < next_eval[0] and t < budget:
                return
            clock.stop()
            acc = task.evaluate(model, tokenizer, task.heldout)
            curve.append(
                {"t": round(clock.wall, 1), "cpu_s": round(clock.cpu, 1), "accuracy": acc, "step": state.global_step,
                 **task.answers}
            )
            log(f"{name} step {state.global_step}: t={clock.wall:.0f}s accuracy {acc:.3f}")
            while next_eval[0] <= t:
                next_eval[0] += eval_every
            if t >= budget:
                control.should_training_stop = True
            else:
                model.train()
                clock.start()

    train = task.loop["train"]
    lora = lora_config(train)
    common = dict(output_dir=str(work / name.replace(" ", "_")), learning_rate=lr, max_steps=10**6, seed=0,
                  bf16=False, use_cpu=True, report_to=[], save_strategy="no", logging_steps=10**6,
                  gradient_checkpointing=False, disable_tqdm=True, lr_scheduler_type="constant",
                  temperature=task.gen["temperature"], top_k=0)
    dataset = datasets.Dataset.from_list(task.trl_rows(task.train))
    # The same CPU kernels prefloop's own train stage gets (LM-head tiles, grouped GQA, the latter set by `load`):
    # methods are compared here, not kernels. On the demo model neither changes anything (small vocabulary, no GQA).
    model = load(task.base)
    size_lm_head_tiles("cpu")
    if side == "grpo":
        from trl import GRPOConfig, GRPOTrainer

        args = GRPOConfig(**common, per_device_train_batch_size=32, num_generations=8,
                          max_completion_length=task.gen["max_new_tokens"])
        trainer = GRPOTrainer(model=model, reward_funcs=task.reward, args=args, train_dataset=dataset,
                              processing_class=tokenizer, peft_config=lora, callbacks=[BudgetAndEval()])
    else:
        from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

        args = OnlineDPOConfig(**common, per_device_train_batch_size=task.online_dpo_batch,
                               max_new_tokens=task.gen["max_new_tokens"], beta=train["beta"],
                               loss_type="ipo" if side.endswith("ipo") else "sigmoid")
        trainer = OnlineDPOTrainer(model=model, reward_funcs=task.reward, args=args, train_dataset=dataset,
                                   processing_class=tokenizer, peft_config=lora, callbacks=[BudgetAndEval()])
    trainer.train()
    clock.stop()
    return {"name": name, "side": side, "lr": lr, "curve": curve, "steps": trainer.state.global_step,
            "train_s": round(clock.wall, 1), "cpu_s": round(clock.cpu, 1)}


def parse_runs(spec: str, task: Task) -> list[tuple[str, float | None]]:
    runs: list[tuple[str, float | None]] = []
    for item in filter(None, spec.split(",")):
        side, _, lr = item.strip().partition("@")
        if side in ("prefloop", "offline"):
            runs.append((side, None))
        elif side in task.lrs:
            runs += [(side, float(lr))] if lr else [(side, x) for x in task.lrs[side]]
        else:
            raise SystemExit(f"--runs: unknown run {item!r}; fix: one of prefloop, offline, {', '.join(task.lrs)}")
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", choices=sorted(TASKS), default="addition")
    parser.add_argument("--budget", type=float, help="training seconds per run (addition 180, instructions 2100)")
    parser.add_argument("--eval-every", type=float, help="TRL runs: training seconds between evaluations")
    parser.add_argument("--runs", default="prefloop,offline,grpo,online-dpo,online-dpo-ipo")
    parser.add_argument("--variant", action="append", default=[], metavar="K=V[,K=V]",
                        help="also run the loop with these demo settings changed, e.g. train.epochs=2 (repeatable)")
    parser.add_argument("--base", help="reuse this base model dir (addition: `python -m prefloop.demo.pretrain DIR`)")
    parser.add_argument("--quick", action="store_true", help="smoke check: weak base, short budget, one lr per side")
    parser.add_argument("--resume", action="store_true",
                        help="keep the runs the results file already holds (same task and budget); run the rest")
    parser.add_argument("--out", help="results file (default bench/results/vs_trl[-task][-variants][.quick].json)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731

    from machine import machine
    from transformers import AutoTokenizer
    from vs_trl_report import plot, summarize, table

    addition = args.task == "addition"
    budget = args.budget or (15.0 if args.quick else 180.0 if addition else 2100.0)
    eval_every = args.eval_every or budget / 6
    work = Path(tempfile.mkdtemp(prefix="prefloop-bench-trl-"))
    task = TASKS[args.task](work, args.base, args.quick, log)
    if args.quick:
        task.lrs = {side: lrs[1:2] for side, lrs in task.lrs.items()}
    tokenizer = AutoTokenizer.from_pretrained(task.base)

    stem = "vs_trl" + ("" if addition else f"-{task.name}") + ("-variants" if args.variant else "")
    out = Path(args.out or RESULTS / f"{stem}{'.quick' if args.quick else ''}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    # An invocation runs for hours: the file is rewritten after every run, and --resume keeps the runs it holds.
    earlier = json.loads(out.read_text()) if args.resume and out.exists() else None
    if earlier and (earlier["task"], earlier["budget_s"]) != (task.name, budget):
        raise SystemExit(f"--resume: {out} holds task {earlier['task']!r} at budget {earlier['budget_s']} s, not "
                         f"{task.name!r} at {budget} s; fix: pass the same --task/--budget, or drop --resume")
    if earlier:
        runs, base = earlier["runs"], earlier["base"]
        log(f"resuming {out}: {len(runs)} runs done, base held-out accuracy {base['accuracy']:.3f}")
    else:
        runs, acc = [], task.evaluate(load(task.base), tokenizer, task.heldout)
        log(f"base held-out accuracy {acc:.3f} ({len(task.heldout)} prompts)")
        base = {"model": "prefloop.demo.pretrain" if addition else str(task.base), "accuracy": acc,
                "heldout": len(task.heldout), **task.answers}
    todo: list[tuple[str, Callable[[], dict]]] = []
    for side, lr in parse_runs(args.runs, task):
        if lr is None:
            offline = side == "offline"
            todo.append((side, lambda o=offline: run_prefloop(task, work, budget, tokenizer, log, offline=o)))
        else:
            todo.append((trl_name(side, lr),
                         lambda s=side, x=lr: run_trl(task, s, x, work, budget, eval_every, tokenizer, log)))
    for variant in args.variant:
        todo.append((f"prefloop {variant}", lambda v=variant: run_prefloop(task, work, budget, tokenizer, log,
                                                                          variant=v)))

    def write(complete: bool) -> dict:
        result = summarize({"date": time.strftime("%Y-%m-%d"), "task": task.name, "quick": args.quick,
                            "budget_s": budget, "base": base, "machine": machine(), "lrs": task.lrs,
                            "offline_prompts": task.offline_prompts, "complete": complete, "runs": runs})
        out.write_text(json.dumps(result, indent=2) + "\n")
        return result

    for name, run in todo:
        if any(r["name"] == name for r in runs):
            log(f"{name}: in {out} already, skipped")
            continue
        runs.append(run())
        write(complete=False)
    result = write(complete=True)
    plot(result, out.with_suffix(".png"))
    print(table(result) + f"\n\nwrote {out} and {out.with_suffix('.png').name}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
