"""Resume overhead of the generate stage: 100k prompts on disk, two completion sizes, no model run to build them.

    python bench/resume.py            # 100k prompts, n=4, 50 and 2,000 characters per completion -> results/resume.json
    python bench/resume.py --quick    # 10k prompts: smoke run (< 2 min)

For each completion size, a candidates file is written through prefloop's own store (`JsonlStore`, with the
stage's sidecars from `StageRun`), records shaped as the stage writes them (id, prompt, 4 completions with text /
finish_reason / num_tokens, model, round, config_hash, columns). Then `prefloop.gen.stage.run` is timed, in process,
on the same config:

  finished          every prompt on disk, summary `done`: run() must return without loading anything. Also timed as
                    the CLI (`prefloop generate ...` in a fresh process, imports included), what a user waits for.
  half: to 1st gen  50k on disk, 50k pending: from run() to the first `generate` call of the backend (the resume
                    bookkeeping: load + validate prompts, config check, tail repair, id scan, pending list, model
                    load, context check). The call is stopped there (an exception raised by a wrapper around the
                    real generator's `generate`): generating 50k prompts is not the overhead being measured.
  nearly done       all but 64 prompts on disk: run() end to end with the real tiny model (max_new_tokens=1), so the
                    stage resumes, generates, appends, and writes its summary.

The claim to check: resume time does not depend on how much completion text is on disk (the store reads ids from the
first bytes of each line, not by parsing records). Ratios between the two sizes in one run are the result.
"""

from __future__ import annotations

import argparse
import json
import random
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
N = 4


class _FirstCall(Exception):
    """Raised by the wrapper at the backend's first `generate` call: the bookkeeping before it is what we time."""


def make_prompts(path: Path, count: int) -> None:
    """Mixed-length plain prompts without ids (so the stage derives content ids, as for most real files)."""
    rng = random.Random(0)
    letters = string.ascii_letters + " "
    with open(path, "w", encoding="utf-8") as f:
        for i in range(count):
            f.write(json.dumps({"prompt": f"{i}: " + "".join(rng.choices(letters, k=rng.randint(4, 60)))}) + "\n")


def write_candidates(config, count: int, chars: int, finished: bool) -> float:
    """Write the first `count` prompts' candidates through the store; mark the stage done if `finished`.
    Returns the candidates file size in MB."""
    from prefloop.gen.executor import candidate
    from prefloop.records import load_prompts
    from prefloop.runstate import StageRun
    from prefloop.store import JsonlStore

    out = Path(config.out)
    for path in out.parent.glob(out.stem + "*"):
        path.unlink()
    prompts = load_prompts(config.prompts).records
    rng = random.Random(1)
    pool = "".join(rng.choices(string.ascii_letters + string.digits + ' .,;:!?"\n', k=chars + 4096))
    state = StageRun("generate", out, config)
    assert state.begin() == "fresh"
    with JsonlStore(out) as store:
        for start in range(0, count, 256):  # the stage's chunk size: one fsync per chunk
            batch = []
            for p in prompts[start : min(count, start + 256)]:
                completions = []
                for _ in range(N):
                    offset = rng.randrange(4096)
                    completions.append({"text": pool[offset : offset + chars], "finish_reason": "length",
                                        "num_tokens": chars // 4})
                batch.append(candidate(p, completions, config.model, config, state.hash))
            store.extend(batch)
    if finished:
        state.finish("done", prompts=len(prompts), written=count)
    return out.stat().st_size / 1e6


def time_run(config) -> float:
    from prefloop.gen.stage import run

    start = time.perf_counter()
    run(config)
    return time.perf_counter() - start


def time_to_first_generate(config) -> float:
    """Seconds from `run(config)` to the backend's first `generate` call (which is then stopped)."""
    from prefloop.gen.hf import HFGenerator
    from prefloop.gen.stage import run

    real = HFGenerator.generate
    reached: list[float] = []

    def first_call(self, *args, **kwargs):
        reached.append(time.perf_counter())
        raise _FirstCall

    HFGenerator.generate = first_call
    try:
        start = time.perf_counter()
        try:
            run(config)
        except _FirstCall:
            pass
        if not reached:
            raise RuntimeError("run() returned without calling generate: the half-finished stage was not resumed")
        return reached[0] - start
    finally:
        HFGenerator.generate = real


def time_cli(config) -> float:
    command = [sys.executable, "-m", "prefloop.cli", "generate", "--model", config.model, "--prompts",
               config.prompts, "--out", config.out, "--n", str(N), "--max-new-tokens", "1", "--dtype", "float32"]
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=100_000)
    parser.add_argument("--sizes", default="50,2000", help="characters per completion, comma list")
    parser.add_argument("--quick", action="store_true", help="smoke run: 10k prompts")
    parser.add_argument("--out", help="results JSON (default bench/results/resume[.quick].json)")
    args = parser.parse_args()
    if args.quick:
        args.prompts = 10_000

    import logging

    logging.basicConfig(level=logging.WARNING)
    sys.path.insert(0, str(Path(__file__).parent))
    from machine import machine

    from prefloop.demo.tiny import save_tiny
    from prefloop.gen.stage import GenerateConfig

    work = Path(tempfile.mkdtemp(prefix="prefloop-resume-"))
    model = save_tiny(work / "model")
    prompts = work / "prompts.jsonl"
    make_prompts(prompts, args.prompts)
    config = GenerateConfig(model=str(model), prompts=str(prompts), out=str(work / "out" / "candidates.jsonl"),
                            n=N, max_new_tokens=1, dtype="float32", batch_size=256)
    rows = []
    for chars in [int(c) for c in args.sizes.split(",")]:
        print(f"== {chars} characters per completion", file=sys.stderr, flush=True)
        row = {"chars_per_completion": chars}
        row["finished_mb"] = round(write_candidates(config, args.prompts, chars, finished=True), 1)
        # Best of 3 (best of 2 for the half-finished case): the finished and half-finished paths change nothing on
        # disk, so they can be repeated, and the least disturbed run is the one that measures the code.
        row["finished_run_s"] = round(min(time_run(config) for _ in range(3)), 3)
        row["finished_cli_s"] = round(min(time_cli(config) for _ in range(3)), 2)
        half = args.prompts // 2
        row["half_mb"] = round(write_candidates(config, half, chars, finished=False), 1)
        row["half_to_first_generate_s"] = round(min(time_to_first_generate(config) for _ in range(2)), 3)
        row["nearly_mb"] = round(write_candidates(config, args.prompts - 64, chars, finished=False), 1)
        row["nearly_done_run_s"] = round(time_run(config), 3)
        summary = json.loads(Path(config.out).with_name("candidates.summary.json").read_text())
        assert summary["status"] == "done" and summary["resumed"] == args.prompts - 64, summary
        rows.append(row)
        print(f"  {row}", file=sys.stderr, flush=True)

    print(f"\n{args.prompts:,} prompts, n={N}; seconds (in process unless marked CLI)\n")
    print("| chars/completion | finished: MB | finished: run() s | finished: CLI s | half: MB | half: to 1st "
          "generate s | nearly done (64 left): MB | nearly done: run() s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['chars_per_completion']:,} | {r['finished_mb']:,} | {r['finished_run_s']:.2f} | "
              f"{r['finished_cli_s']:.1f} | {r['half_mb']:,} | {r['half_to_first_generate_s']:.2f} | "
              f"{r['nearly_mb']:,} | {r['nearly_done_run_s']:.2f} |")
    targets = {}
    if len(rows) >= 2:
        small, large = rows[0], rows[-1]
        for key in ("finished_run_s", "half_to_first_generate_s", "nearly_done_run_s"):
            ratio = large[key] / max(small[key], 1e-9)
            # "independent of completion size": within 2x on a noisy shared machine, for 40x more text on disk
            targets[f"{key}_large_over_small"] = {"value": round(ratio, 2), "target": "<= 2", "met": ratio <= 2}
        worst = max(r["finished_cli_s"] for r in rows)
        targets["finished_cli_seconds"] = {"value": worst, "target": "<= 10 s", "met": worst <= 10}
    for name, t in targets.items():
        print(f"target {name}: {t['value']} ({t['target']}) -> {'met' if t['met'] else 'NOT met'}")
    out = Path(args.out or RESULTS / f"resume{'.quick' if args.quick else ''}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine(), "prompts": args.prompts, "n": N, "rows": rows,
                               "targets": targets}, indent=2) + "\n")
    print(f"\nwrote {out}")
    import shutil

    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
