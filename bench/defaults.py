"""Which train defaults help an untuned model: one round on three verifiable tasks, several settings, same pairs.

    python bench/defaults.py                      # -> bench/results/defaults.json (about 40 minutes on 2 cores)
    python bench/defaults.py --tasks addition     # one task
    python bench/readme.py                        # then docs/defaults.md's table is rendered from it

Per task, once: the base answers the held-out prompts greedily (held-out accuracy before), samples `n` answers to
the round's training prompts, and the task's verifier scores them. Then per setting: pairs from those judgments
(`strategy`), one `prefloop train` run from the base with the setting's loss and learning rate (everything else at
the train stage's defaults: LoRA r16, beta 0.1, 1 epoch, batch 8), and greedy held-out accuracy after. Every run
sees the same samples, so the settings differ only in what they train.

Tasks: `addition` (the demo's tiny model, taught 2-digit addition to a weak start), `instructions` (SmolLM2-135M-
Instruct, verifiable instruction following) and `word_problems` (SmolLM2 on one-step arithmetic stories, a task
prefloop never pretrained it for).
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

from machine import machine

from prefloop.config import from_dict
from prefloop.gen.stage import GenerateConfig
from prefloop.gen.stage import run as generate
from prefloop.judge.pairs import PairsConfig
from prefloop.judge.pairs import run as make_pairs
from prefloop.judge.stage import JudgeConfig
from prefloop.judge.stage import run as judge
from prefloop.store import atomic_write, dumps, read_records
from prefloop.train.dpo import TrainConfig
from prefloop.train.dpo import run as train

HERE = Path(__file__).parent
log = logging.getLogger("bench.defaults")

# name -> (train settings over the stage defaults, pairs settings over best_worst). The first is the train stage's
# old default.
SFT = {"loss": ["sigmoid", "sft"]}
SETTINGS = {
    "sigmoid": ({"loss": ["sigmoid"]}, {}),
    "sigmoid+sft": (SFT, {}),
    "sigmoid+sft all-pairs": (SFT, {"strategy": "all_above_margin"}),
    "sigmoid+sft cut-rejected": (SFT, {"truncated_rejected": True}),
    "ipo": ({"loss": ["ipo"]}, {}),
}
DEFAULT_SETTINGS = "sigmoid,sigmoid+sft,sigmoid+sft all-pairs,sigmoid+sft cut-rejected"


def task_setup(name: str, work: Path) -> dict:
    """The task's model, prompt files and stage settings (built or written under `work`)."""
    if name == "addition":
        from prefloop.demo.pretrain import pretrain
        from prefloop.tasks.addition import make_prompts

        base = work / "base"
        if not (base / "config.json").exists():
            pretrain(base)
        train, heldout = work / "train.jsonl", work / "heldout.jsonl"
        atomic_write(train, "".join(dumps(r) for r in make_prompts(512, seed=1, split="train")))
        atomic_write(heldout, "".join(dumps(r) for r in make_prompts(500, seed=0, split="heldout")))
        gen = {"backend": "hf", "max_new_tokens": 5, "batch_size": 512, "chunk_size": 512, "dtype": "float32"}
        return {"model": str(base), "train": train, "heldout": heldout, "gen": gen, "n": 8, "temperature": 1.0,
                "reward": "prefloop.tasks.addition:reward", "strict": "prefloop.tasks.addition:reward", "train_dtype": "float32"}
    from prefloop.models import resolve_model

    model = resolve_model("smollm2", dtype="float32")
    if name == "instructions":
        from prefloop.tasks.instructions import make_prompts as task_prompts

        reward, strict, tokens = "prefloop.tasks.instructions:reward", "prefloop.tasks.instructions:strict", 160
    else:
        from prefloop.tasks.word_problems import make_prompts as task_prompts

        reward = strict = "prefloop.tasks.word_problems:reward"
        tokens = 128
    train, heldout = work / "train.jsonl", work / "heldout.jsonl"
    atomic_write(train, "".join(dumps(r) for r in task_prompts(128, "train", seed=1)))
    atomic_write(heldout, "".join(dumps(r) for r in task_prompts(100, "heldout", seed=0)))
    gen = {"backend": "auto", "max_new_tokens": tokens, "chat": True, "dtype": "float32", "max_lora_rank": 16}
    return {"model": str(model), "train": train, "heldout": heldout, "gen": gen, "n": 4, "temperature": 0.8,
            "reward": reward, "strict": strict, "train_dtype": "float32"}


def accuracy(setup: dict, out: Path, adapter: str | None) -> dict:
    """Greedy held-out answers of the base (+ adapter), scored by the strict verifier."""
    candidates = generate(from_dict(GenerateConfig, {
        **setup["gen"], "model": setup["model"], "adapter": adapter, "prompts": str(setup["heldout"]),
        "out": str(out / "eval_candidates.jsonl"), "n": 1, "temperature": 0.0}))
    judgments = judge(from_dict(JudgeConfig, {"candidates": str(candidates), "out": str(out / "eval_judgments.jsonl"),
                                              "judge": "python", "reward_fn": setup["strict"]}))
    rows = read_records(judgments)
    scores = [s or 0.0 for r in rows for s in r["scores"]]
    chars = [len(c["text"]) for r in rows for c in r["completions"]]
    return {"accuracy": round(sum(scores) / len(scores), 4), "mean_answer_chars": round(sum(chars) / len(chars), 1)}


def run_task(name: str, work: Path, settings: list[str]) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    setup = task_setup(name, work)
    started = time.monotonic()
    result = {"task": name, "model": Path(setup["model"]).name, "n": setup["n"], "base": accuracy(setup, work / "base-eval", None)}
    samples = generate(from_dict(GenerateConfig, {
        **setup["gen"], "model": setup["model"], "prompts": str(setup["train"]), "out": str(work / "candidates.jsonl"),
        "n": setup["n"], "temperature": setup["temperature"], "round": 1, "seed": 1}))
    judgments = judge(from_dict(JudgeConfig, {"candidates": str(samples), "out": str(work / "judgments.jsonl"),
                                              "judge": "python", "reward_fn": setup["reward"]}))
    result["prompts"] = len(read_records(judgments))
    result["settings"] = {}
    for label in settings:
        overrides, pairs_overrides = SETTINGS[label]
        d = work / label.replace(" ", "_").replace("+", "-")
        pairs = make_pairs(from_dict(PairsConfig, {"judgments": str(judgments), "out": str(d / "pairs.jsonl"),
                                                   "round": 1, "seed": 1, **pairs_overrides}))
        began = time.monotonic()
        trained = train(from_dict(TrainConfig, {"model": setup["model"], "pairs": str(pairs), "out": str(d / "train"),
                                                "dtype": setup["train_dtype"], "gradient_checkpointing": False,
                                                "seed": 1, **overrides}))
        train_s = round(time.monotonic() - began, 1)
        after = accuracy(setup, d, str(trained / "adapter"))
        result["settings"][label] = {**after, "pairs": len(read_records(pairs)), "train_s": train_s,
                                     "delta": round(after["accuracy"] - result["base"]["accuracy"], 4)}
        log.info("%s / %s: %s", name, label, result["settings"][label])
    result["wall_s"] = round(time.monotonic() - started, 1)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default="addition,instructions,word_problems")
    parser.add_argument("--settings", default=DEFAULT_SETTINGS, help="Comma list of SETTINGS names.")
    parser.add_argument("--work", default=None, help="Working directory (re-running resumes every stage).")
    parser.add_argument("--out-json", default=str(HERE / "results" / "defaults.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    work = Path(args.work or tempfile.mkdtemp(prefix="prefloop-defaults-"))
    settings = args.settings.split(",")
    unknown = [s for s in settings if s not in SETTINGS]
    if unknown:
        raise SystemExit(f"unknown settings {unknown}; choose from {', '.join(SETTINGS)}")
    from prefloop.gen.vllm import keep_engine

    out = Path(args.out_json)
    report = json.loads(out.read_text()) if out.exists() else {"tasks": {}}
    with keep_engine():  # SmolLM2's tasks share one vLLM engine (each setting's adapter a LoRARequest)
        for name in args.tasks.split(","):
            report["tasks"][name] = run_task(name, work / name, settings)
            report.update(machine=machine(), settings={k: {"train": v[0], "pairs": v[1]} for k, v in
                                                       SETTINGS.items()})
            out.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")  # after every task
    print(json.dumps(report["tasks"], indent=1))


if __name__ == "__main__":
    main()
