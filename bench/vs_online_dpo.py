"""The whole loop vs TRL's `OnlineDPOTrainer`: held-out accuracy reached in the same wall-clock training budget.

    python bench/vs_online_dpo.py                  # 180 s of training per side (+ ~90 s base build, + evals)
    python bench/vs_online_dpo.py --quick          # smoke check, < 2 min: weaker base, 20 s per side
    python bench/vs_online_dpo.py --base DIR       # reuse a base model built by `python -m prefloop.demo.pretrain DIR`

Both sides start from the SAME weak demo model (built once by `prefloop.demo.pretrain.pretrain` at its defaults, the
demo's own round-0 policy), sample from the same 9,000-problem train pool, are rewarded by the same python verifier
(`prefloop.tasks.addition:reward`, which already follows TRL's reward-function signature: the dataset's `answer` column
arrives as a keyword), and are scored by the same function on the same 500 held-out sums:
`prefloop.demo.pretrain.accuracy` (greedy, decoded answer == reference). Sides run one after the other, never together.

Rows:
  prefloop          `prefloop.loop.run` with the demo's settings (`prefloop.demo.addition.DEMO`: 2,048 prompts per round,
                    8 samples at T=1, best-vs-worst pairs, LoRA r=16, sigmoid+SFT loss, lr 5e-3, batch 32, 5 epochs),
                    one round at a time until the budget is spent; each round's adapter is evaluated after it.
  online-dpo lr=X   `trl.experimental.online_dpo.OnlineDPOTrainer`: 2 samples per prompt from the policy itself
                    (transformers `generate`, T=1, max_new_tokens=5 as prefloop's), the verifier picks chosen,
                    sigmoid DPO loss (beta 0.1), the same LoRA, batch 32 prompts, fp32, no gradient checkpointing
                    (as the demo). Learning rates: the demo's, 3x it and 0.1x it. Evaluated every `--eval-every` seconds
                    from a TrainerCallback; training stops when the budget is spent.

Time = wall seconds of training (generation, judging, pair building and DPO for prefloop; the trainer's steps for
OnlineDPO), with model build and every evaluation excluded. CPU s = process CPU seconds over the same spans: the
machine is shared, so a side that got less CPU shows it. "accuracy at t" = the accuracy of the newest checkpoint
finished by t. Seeds are fixed (pretrain seed 0, loop seed 0, trainer seed 0). Writes
bench/results/vs_online_dpo.json and vs_online_dpo.png.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
RESULTS = Path(__file__).parent / "results"
HELDOUT = 500  # as the demo (prefloop.demo.addition.HELDOUT)


class Clock:
    """Training time and CPU time, with spans (evaluations) cut out by `paused()`."""

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

    def now(self) -> tuple[float, float]:
        if self._start is None:
            return self.wall, self.cpu
        return self.wall + time.perf_counter() - self._start[0], self.cpu + time.process_time() - self._start[1]


def heldout_accuracy(model, tokenizer, heldout: list[dict]) -> float:
    """The one eval both sides use: prefloop's greedy held-out accuracy, on the model as it is in memory."""
    from prefloop.demo.pretrain import accuracy

    return accuracy(model, tokenizer, heldout)


def run_prefloop(base: Path, data: Path, work: Path, budget: float, heldout: list[dict], log) -> dict:
    """The demo's loop, one round per call (the loop resumes and runs the next round), until the budget is spent."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from prefloop.config import from_dict
    from prefloop.demo.addition import DEMO
    from prefloop.loop import LoopConfig
    from prefloop.loop import run as run_loop

    tokenizer = AutoTokenizer.from_pretrained(base)
    clock, curve, rounds = Clock(), [], []
    k = 0
    while clock.wall < budget:
        k += 1
        # No loop eval (it would count as training time): accuracy comes from the shared function below.
        values = {**DEMO, "out": str(work / "prefloop"), "model": str(base), "prompts": str(data / "train.jsonl"),
                  "eval_prompts": None, "rounds": k}
        clock.start()
        run_loop(from_dict(LoopConfig, values, "bench settings"))
        clock.stop()
        adapter = work / "prefloop" / f"round_{k:03d}" / "train" / "adapter"
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
        acc = heldout_accuracy(model, tokenizer, heldout)
        manifest = json.loads((work / "prefloop" / "manifest.json").read_text())
        phases = {name: p.get("seconds") for name, p in manifest["rounds"][k]["phases"].items()}
        curve.append({"t": round(clock.wall, 1), "cpu_s": round(clock.cpu, 1), "accuracy": acc, "round": k})
        rounds.append({"round": k, "phases": phases})
        log(f"prefloop round {k}: t={clock.wall:.0f}s cpu={clock.cpu:.0f}s accuracy {acc:.3f}")
    return {"name": "prefloop", "settings": "prefloop.demo.addition.DEMO (unchanged)", "curve": curve, "rounds": rounds,
            "train_s": round(clock.wall, 1), "cpu_s": round(clock.cpu, 1)}


def run_online_dpo(base: Path, train: list[dict], budget: float, heldout: list[dict], lr: float, eval_every: float,
                   batch_size: int, work: Path, log) -> dict:
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

    from prefloop.demo.addition import DEMO
    from prefloop.tasks.addition import reward

    clock, curve = Clock(), []
    next_eval = [eval_every]

    class BudgetAndEval(TrainerCallback):
        """Evaluates every `eval_every` training seconds (clock paused) and stops training at the budget."""

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            clock.start()

        def on_step_end(self, args, state, control, model=None, **kwargs):
            t, _ = clock.now()
            if t >= next_eval[0] or t >= budget:
                clock.stop()
                acc = heldout_accuracy(model, tokenizer, heldout)
                curve.append({"t": round(clock.wall, 1), "cpu_s": round(clock.cpu, 1), "accuracy": acc,
                              "step": state.global_step})
                log(f"online-dpo lr={lr:g} step {state.global_step}: t={clock.wall:.0f}s accuracy {acc:.3f}")
                while next_eval[0] <= t:
                    next_eval[0] += eval_every
                if t >= budget:
                    control.should_training_stop = True
                else:
                    model.train()
                    clock.start()

    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    train_cfg, gen_cfg = DEMO["train"], DEMO["gen"]
    args = OnlineDPOConfig(
        output_dir=str(work / f"online-dpo-{lr:g}"), learning_rate=lr, per_device_train_batch_size=batch_size,
        max_steps=10**6, max_new_tokens=gen_cfg["max_new_tokens"], temperature=gen_cfg["temperature"], top_k=0,
        beta=train_cfg["beta"], loss_type="sigmoid", seed=0, bf16=False, use_cpu=True, report_to=[],
        save_strategy="no", logging_steps=10**6, gradient_checkpointing=False, disable_tqdm=True,
        lr_scheduler_type="constant",  # max_steps is a stand-in for "until the budget": no decay towards it
    )
    peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = OnlineDPOTrainer(model=model, reward_funcs=reward, args=args, processing_class=tokenizer,
                               train_dataset=datasets.Dataset.from_list(train), peft_config=peft_config,
                               callbacks=[BudgetAndEval()])
    trainer.train()
    clock.stop()
    return {"name": f"online-dpo lr={lr:g}", "lr": lr, "batch_size": batch_size, "curve": curve,
            "steps": trainer.state.global_step, "train_s": round(clock.wall, 1), "cpu_s": round(clock.cpu, 1)}


def at(curve: list[dict], t: float, start: float) -> float:
    """Accuracy of the newest checkpoint finished by time t (the base model's before the first)."""
    done = [p["accuracy"] for p in curve if p["t"] <= t + 1e-9]
    return done[-1] if done else start


def plot(runs: list[dict], base_acc: float, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in runs:
        xs = [0.0] + [p["t"] for p in r["curve"]]
        ys = [base_acc] + [p["accuracy"] for p in r["curve"]]
        ax.plot(xs, [100 * y for y in ys], marker="o", label=r["name"])
    ax.set_xlabel("training seconds (evals excluded)")
    ax.set_ylabel("held-out accuracy, %")
    ax.set_title("2-digit addition, same base model and verifier")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budget", type=float, default=180.0, help="training seconds per side")
    parser.add_argument("--eval-every", type=float, default=30.0, help="OnlineDPO: training seconds between evals")
    parser.add_argument("--lrs", default="5e-3,1.5e-2,5e-4", help="OnlineDPO learning rates (demo's, 3x, 0.1x)")
    parser.add_argument("--batch-size", type=int, default=32, help="OnlineDPO prompts per step (demo: 32 pairs)")
    parser.add_argument("--base", help="reuse this base model dir (default: build it with prefloop.demo.pretrain)")
    parser.add_argument("--sides", default="prefloop,online-dpo")
    parser.add_argument("--quick", action="store_true", help="smoke check (< 2 min): weak base, 20 s per side")
    parser.add_argument("--out", default=str(RESULTS / "vs_online_dpo.json"))
    parser.add_argument("--keep", action="store_true", help="keep the work dir (base model, loop run dir)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731

    import torch

    from prefloop.demo.pretrain import accuracy, pretrain
    from prefloop.store import dumps
    from prefloop.tasks.addition import make_prompts, split_size

    lrs = [float(x) for x in args.lrs.split(",")]
    if args.quick:
        args.budget, args.eval_every, lrs = 20.0, 10.0, lrs[:1]
        args.out = str(Path(args.out).with_name("vs_online_dpo.quick.json"))
    work = Path(tempfile.mkdtemp(prefix="prefloop-bench-online-"))
    if args.base:
        base = Path(args.base)
    else:
        start = time.perf_counter()
        # --quick: a fixed short pretraining (the default stops at 30% probe accuracy, ~1-1.5 min).
        kwargs = {"steps": 150, "stop_at_accuracy": None} if args.quick else {}
        base = pretrain(work / "base", log=lambda m: None, **kwargs)
        log(f"base model built in {time.perf_counter() - start:.0f}s")
    data = work / "data"
    data.mkdir()
    train = make_prompts(split_size("train"), seed=0, split="train")  # the demo's pool
    (data / "train.jsonl").write_text("".join(dumps(r) for r in train))
    heldout = make_prompts(HELDOUT, seed=0, split="heldout")  # the demo's held-out set
    if args.quick:
        heldout = heldout[:200]
    base_acc = accuracy(base, records=heldout)
    log(f"base held-out accuracy {base_acc:.3f}")

    runs = []
    sides = args.sides.split(",")
    if "prefloop" in sides:
        runs.append(run_prefloop(base, data, work, args.budget, heldout, log))
    if "online-dpo" in sides:
        for lr in lrs:
            runs.append(run_online_dpo(base, train, args.budget, heldout, lr, args.eval_every, args.batch_size,
                                       work, log))

    grid = sorted({round(args.budget * i / 6) for i in range(1, 7)})
    print(f"\nbase model: held-out accuracy {base_acc:.1%} ({len(heldout)} sums); budget {args.budget:.0f} s of "
          f"training per side; {os.cpu_count()} cores, {torch.get_num_threads()} torch threads\n")
    print("| training s | " + " | ".join(r["name"] for r in runs) + " |")
    print("| --- | " + " | ".join("---" for _ in runs) + " |")
    for t in [0] + grid:
        print(f"| {t} | " + " | ".join(f"{at(r['curve'], t, base_acc):.1%}" for r in runs) + " |")
    print("\n| side | final accuracy at budget | training s (CPU s) | checkpoints |")
    print("| --- | --- | --- | --- |")
    for r in runs:
        r["accuracy_at_budget"] = at(r["curve"], args.budget, base_acc)
        print(f"| {r['name']} | {r['accuracy_at_budget']:.1%} | {r['train_s']:.0f} ({r['cpu_s']:.0f}) | "
              f"{len(r['curve'])} |")
    target = None
    if runs and runs[0]["name"] == "prefloop" and len(runs) > 1:
        best = max(r["accuracy_at_budget"] for r in runs[1:])
        target = runs[0]["accuracy_at_budget"] > best
        print(f"\ntarget (prefloop higher at equal time): {'met' if target else 'NOT met'} "
              f"({runs[0]['accuracy_at_budget']:.1%} vs best OnlineDPO {best:.1%})")
    result = {"date": time.strftime("%Y-%m-%d"), "quick": args.quick, "budget_s": args.budget,
              "base": {"accuracy": base_acc, "heldout": len(heldout),
                       "pretrain": json.loads((base / "pretrain.json").read_text()).get("steps")
                       if (base / "pretrain.json").exists() else None},
              "machine": {"cores": os.cpu_count(), "platform": platform.platform(),
                          "torch_threads": torch.get_num_threads()},
              "grid": {str(t): {r["name"]: at(r["curve"], t, base_acc) for r in runs} for t in [0] + grid},
              "target_met": target, "runs": runs}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    plot(runs, base_acc, Path(args.out).with_suffix(".png"))
    print(f"\nwrote {args.out}")
    if args.keep:
        print(f"work dir kept: {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
