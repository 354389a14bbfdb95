"""DPO training cost: prefloop's default (LoRA, reference = adapter disabled) vs TRL's default full fine-tune.

    python bench/dpo_train.py              # 3 cases: demo model on demo sums, 25.8M model on sums and on long text
    python bench/dpo_train.py --quick      # smoke check, < 2 min
    python bench/dpo_train.py --cases smollm2-instructions --out bench/results/dpo_train-smollm2.json
                                           # the real model (~10 min): SmolLM2-135M-Instruct, chat pairs

Rows, on the same model, pairs, batch size, step count, data order and torch threads:
  prefloop   `prefloop.train.dpo.run(TrainConfig(model, pairs, out))` with nothing else set: LoRA r=16 on every
             linear layer, the reference is the same model with the adapter disabled (no second copy in memory),
             dtype auto, gradient checkpointing on.
  prefloop, gradient_checkpointing off
             the same with `TrainConfig(gradient_checkpointing=False)` (the demo's setting): for reference, it shows
             what recomputing activations costs and saves at each size.
  prefloop, TRL's LM-head tiles
             the default with `prefloop.train.kernels.CPU_TILES = None`: TRL's fused LM head projects in its own
             GPU-sized tiles (4,096 tokens x 32,768 vocabulary rows) instead of prefloop's CPU tiles (512 x 4,096).
  trl full   `trl.DPOTrainer(model, args=DPOConfig(...), train_dataset, processing_class)` with no peft_config:
             every weight trains and TRL makes a frozen reference copy of the model (its default). DPOConfig
             defaults (bf16 autocast, gradient checkpointing) except the shared batch size/steps/seed.

tokens/s = (prompt + chosen + rejected) tokens trained per wall second of `trainer.train()`, model/data loading
excluded; the first `--warmup` steps are excluded too (first-call costs are not throughput). Each row runs in its
own child process, so peak RSS (`ru_maxrss` of that child) is per row; `+RSS` is the peak minus the RSS after
imports, before the model loads: what the training itself costs. CPU s = process CPU seconds over the same steps
(the machine is shared: CPU seconds say whether a slow row was starved or busy). The tiny cases' weights are
random, built locally (no downloads): speed and memory do not depend on what the model knows. `smollm2-instructions`
is the real SmolLM2-135M-Instruct (the packaged GGUF as an fp32 checkpoint) on conversational pairs: the instruction
task's prompts, answers of 60-140 words, as the loop's DPO step sees them. Ratios are the result, every row
is measured in the same run. Writes bench/results/dpo_train.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import machine  # bench/machine.py (scripts run as `python bench/X.py`)

SIZES = {  # TinyConfig fields; "demo" is TinyConfig()'s default, the demo's policy
    "demo": {},
    "small": {"hidden_size": 512, "intermediate_size": 1408, "num_hidden_layers": 8, "num_attention_heads": 8},
}
# (model size, inputs, steps): sums are the demo's pairs ("12+34=" -> "46" vs "47", ~10 tokens per sequence).
CASES = {
    "demo-sums": ("demo", "sums", 60),
    "small-sums": ("small", "sums", 40),
    "small-long": ("small", "long", 12),
    "smollm2-instructions": ("smollm2", "chat", 6),
}
REAL = {"smollm2"}  # packaged models (prefloop.models.resolve_model), not built
BATCH_SIZE = 8  # both tools' default per-device batch size
ROWS = {  # child row -> table label; the targets compare the first and the last
    "prefloop": "prefloop default (LoRA)",
    "prefloop-nockpt": "prefloop, gradient_checkpointing off",
    "prefloop-trl-tiles": "prefloop, TRL's LM-head tiles",
    "trl": "TRL default (full + ref copy)",
}


def make_pairs(count: int, inputs: str, seed: int = 0) -> list[dict[str, str]]:
    """Standard (plain-text) TRL pairs. `sums`: demo addition pairs; `long`: 32-160 character (= token) texts."""
    rng = random.Random(seed)
    if inputs == "chat":  # conversational pairs as the loop writes them for a chat model
        from prefloop.tasks.instructions import make_prompts as instruction_prompts

        rows = instruction_prompts(count, split="train", seed=seed)
        words = sorted({w for r in rows for w in r["prompt"][0]["content"].split()})
        answer = lambda: [{"role": "assistant", "content": " ".join(rng.choices(words, k=rng.randint(60, 140)))}]  # noqa: E731
        return [{"prompt": r["prompt"], "chosen": answer(), "rejected": answer()} for r in rows]
    if inputs == "sums":
        from prefloop.tasks.addition import make_prompts

        out = []
        for r in make_prompts(count, seed=seed, split="train"):
            wrong = str(max(0, int(r["answer"]) + rng.choice([-10, -1, 1, 10])))
            out.append({"prompt": r["prompt"], "chosen": r["answer"], "rejected": wrong})
        return out
    text = lambda lo, hi: "".join(rng.choices(string.ascii_letters + " ", k=rng.randint(lo, hi)))  # noqa: E731
    return [{"prompt": text(32, 160), "chosen": text(32, 160), "rejected": text(32, 160)} for _ in range(count)]


def count_tokens(tokenizer, pairs: list[dict]) -> int:
    """Tokens a DPO step processes per pair: prompt + chosen + EOS and prompt + rejected + EOS (chat pairs: the
    chat template's rendering of each conversation)."""
    if isinstance(pairs[0]["prompt"], list):
        n = lambda messages: len(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])  # noqa: E731
        return sum(n(p["prompt"] + p["chosen"]) + n(p["prompt"] + p["rejected"]) for p in pairs)
    n = lambda s: len(tokenizer(s, add_special_tokens=False)["input_ids"])  # noqa: E731
    return sum(2 * n(p["prompt"]) + n(p["chosen"]) + n(p["rejected"]) + 2 for p in pairs)


def vm_rss_kb() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0



def step_clock():
    """A TrainerCallback recording (wall, CPU) time at train begin and after every optimizer step."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self):
            self.marks: list[tuple[float, float]] = []

        def on_train_begin(self, args, state, control, **kwargs):
            self.marks.append((time.perf_counter(), time.process_time()))

        def on_step_end(self, args, state, control, **kwargs):
            self.marks.append((time.perf_counter(), time.process_time()))

    return StepClock()


def child(args: argparse.Namespace) -> None:
    """One row in this process; prints `RESULT {json}` as its last line."""
    import logging

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    import datasets  # noqa: F401  (imports before the baseline RSS: they are not training memory)
    import peft  # noqa: F401
    import trl

    from prefloop.train.dpo import TrainConfig, load_pairs
    from prefloop.train.dpo import run as train

    logging.basicConfig(level=logging.WARNING)
    base_rss = vm_rss_kb()
    clock = step_clock()
    out = Path(args.work) / f"out-{args.row}"
    if args.row == "prefloop-trl-tiles":
        from prefloop.train import kernels

        kernels.CPU_TILES = None
    if args.row.startswith("prefloop"):
        extra = {"gradient_checkpointing": False} if args.row == "prefloop-nockpt" else {}
        config = TrainConfig(model=args.model, pairs=args.pairs, out=str(out), max_steps=args.steps,
                             batch_size=BATCH_SIZE, logging_steps=10**6, save_steps=10**6, **extra)
        train(config, callbacks=[clock])
        summary = json.loads((out / "train_summary.json").read_text())
        what = "LoRA r=16, ref = adapter off"
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        dataset = load_pairs(args.pairs)
        config = trl.DPOConfig(output_dir=str(out), max_steps=args.steps, per_device_train_batch_size=BATCH_SIZE,
                               seed=0, report_to=[], logging_steps=10**6, save_strategy="no", use_cpu=True,
                               disable_tqdm=True)
        trainer = trl.DPOTrainer(model=AutoModelForCausalLM.from_pretrained(args.model), args=config,
                                 train_dataset=dataset, processing_class=AutoTokenizer.from_pretrained(args.model),
                                 callbacks=[clock])
        if trainer.ref_model is None:
            sys.exit("TRL made no reference copy: its default changed; this row would not be TRL's default")
        trainer.train()
        what = "full fine-tune, ref = frozen copy"
        summary = {}
    marks = clock.marks[args.warmup :]  # [train-begin, step 1, ...]: from the end of the last warm-up step
    if len(marks) < 2:
        sys.exit(f"only {len(clock.marks) - 1} steps ran; raise --steps above --warmup")
    (w0, c0), (w1, c1) = marks[0], marks[-1]
    timed_steps = len(marks) - 1
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KB on Linux
    result = {"row": args.row, "what": what, "steps_timed": timed_steps, "seconds": round(w1 - w0, 3),
              "cpu_seconds": round(c1 - c0, 3), "peak_rss_mb": round(peak / 1024, 1),
              "train_rss_mb": round((peak - base_rss) / 1024, 1), "torch_threads": torch.get_num_threads(),
              "prefloop_summary_tokens_per_s": summary.get("tokens_per_s")}
    print("RESULT " + json.dumps(result), flush=True)


def run_row(row: str, model: str, case_dir: Path, steps: int, warmup: int, threads: int | None, quiet: bool) -> dict:
    command = [sys.executable, __file__, "--child", row, "--model", model,
               "--pairs", str(case_dir / "pairs.jsonl"), "--work", str(case_dir), "--steps", str(steps),
               "--warmup", str(warmup)] + (["--threads", str(threads)] if threads else [])
    env = {**os.environ, "TRL_EXPERIMENTAL_SILENCE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(command, capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.exit(f"row {row} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    if not quiet:
        print(proc.stderr[-2000:], file=sys.stderr)
    return json.loads(lines[-1][len("RESULT ") :])


def measure(name: str, steps: int, warmup: int, threads: int | None, work: Path, verbose: bool) -> dict:
    from transformers import AutoConfig, AutoTokenizer

    from prefloop.demo.tiny import TinyConfig, save_tiny
    from prefloop.models import resolve_model

    size, inputs, _ = CASES[name]
    case_dir = work / name
    case_dir.mkdir(parents=True, exist_ok=True)
    if size in REAL:
        model = resolve_model(size, dtype="float32")
    else:
        model = str(save_tiny(case_dir / "model", TinyConfig(max_position_embeddings=512, **SIZES[size])))
    pairs = make_pairs(steps * BATCH_SIZE, inputs)
    (case_dir / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    tokens = count_tokens(AutoTokenizer.from_pretrained(model), pairs)
    c = AutoConfig.from_pretrained(model)
    embeddings = (1 if c.tie_word_embeddings else 2) * c.vocab_size * c.hidden_size
    kv = c.hidden_size * c.num_key_value_heads // c.num_attention_heads
    params = c.num_hidden_layers * (2 * c.hidden_size**2 + 2 * c.hidden_size * kv
                                    + 3 * c.hidden_size * c.intermediate_size) + embeddings  # norms omitted
    rows = {}
    for row in ROWS:
        print(f"  {name}: {row} ...", file=sys.stderr, flush=True)
        r = run_row(row, model, case_dir, steps, warmup, threads, not verbose)
        r["tokens"] = round(tokens * r["steps_timed"] / steps)
        r["tokens_per_s"] = round(r["tokens"] / r["seconds"], 1)
        rows[row] = r
    p, t = rows["prefloop"], rows["trl"]
    return {"case": name, "model": size, "params_approx": params, "inputs": inputs, "pairs": len(pairs),
            "mean_tokens_per_pair": round(tokens / len(pairs), 1), "batch_size": BATCH_SIZE, "steps": steps,
            "warmup_steps": warmup, "rows": rows,
            "speed_ratio": round(p["tokens_per_s"] / t["tokens_per_s"], 3),
            "cpu_per_token_ratio": round((p["cpu_seconds"] / p["tokens"]) / (t["cpu_seconds"] / t["tokens"]), 3),
            "train_rss_ratio": round(p["train_rss_mb"] / max(t["train_rss_mb"], 1e-9), 3),
            "peak_rss_ratio": round(p["peak_rss_mb"] / t["peak_rss_mb"], 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma list of {', '.join(CASES)}")
    parser.add_argument("--steps-scale", type=float, default=1.0, help="multiply every case's step count")
    parser.add_argument("--warmup", type=int, default=3, help="steps excluded from the timing")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per row (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="smoke check: small cases, few steps (< 2 min)")
    parser.add_argument("--verbose", action="store_true", help="show each row's log tail")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "dpo_train.json"))
    parser.add_argument("--child", choices=list(ROWS), help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--pairs", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.row = args.child
        return child(args)

    cases = args.cases.split(",")
    scale = args.steps_scale
    if args.quick:
        cases, scale, args.warmup = ["demo-sums", "small-sums"], 0.25, 2
        args.out = str(Path(args.out).with_name("dpo_train.quick.json"))
    unknown = set(cases) - set(CASES)
    if unknown:
        sys.exit(f"unknown case(s) {sorted(unknown)}; choose from {', '.join(CASES)}")

    runs = []
    with tempfile.TemporaryDirectory(prefix="prefloop-bench-dpo-") as tmp:
        for name in cases:
            steps = max(args.warmup + 2, round(CASES[name][2] * scale))
            runs.append(measure(name, steps, args.warmup, args.threads, Path(tmp), args.verbose))

    threads = runs[0]["rows"]["prefloop"]["torch_threads"]
    print(f"\n{os.cpu_count()} cores ({machine()['cpu_flags']}), {threads} torch threads per row; batch {BATCH_SIZE}; "
          f"first {args.warmup} steps untimed\n")
    print("| case | params | tokens/pair | row | tokens/s | CPU s | peak RSS MB | +RSS MB (training) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in runs:
        for key, label in ROWS.items():
            x = r["rows"][key]
            print(f"| {r['case']} | {r['params_approx'] / 1e6:.1f}M | {r['mean_tokens_per_pair']} | {label} | "
                  f"{x['tokens_per_s']:,.0f} | {x['cpu_seconds']:.1f} | {x['peak_rss_mb']:,.0f} | "
                  f"{x['train_rss_mb']:,.0f} |")
    print("\nTargets (issue 18): prefloop's default at least TRL's default speed, at most 0.6x its peak memory:\n")
    print("| case | speed prefloop/TRL (target >= 1) | peak RSS prefloop/TRL (target <= 0.6) | +RSS prefloop/TRL | met |")
    print("| --- | --- | --- | --- | --- |")
    for r in runs:
        r["target_met"] = {"speed": r["speed_ratio"] >= 1.0, "memory": r["peak_rss_ratio"] <= 0.6}
        met = "yes" if all(r["target_met"].values()) else "NO"
        print(f"| {r['case']} | {r['speed_ratio']:.2f}x | {r['peak_rss_ratio']:.2f}x | {r['train_rss_ratio']:.2f}x | "
              f"{met} |")
    result = {"date": time.strftime("%Y-%m-%d"),
              "machine": {**machine(), "torch_threads": threads, "trl": __import__("trl").__version__,
                          "peft": __import__("peft").__version__},
              "quick": args.quick, "runs": runs}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
