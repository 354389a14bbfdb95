"""The README's demo numbers: run `prefloop demo` in a fresh directory and record what it measured.

    python bench/demo.py                      # -> bench/results/demo.json (about 5 minutes on 2 cores)
    python bench/demo.py --backend vllm --rounds 2 --out-json bench/results/demo-vllm.json
    python bench/demo.py --task instructions --out-json bench/results/demo-instructions.json   # SmolLM2, ~20-40 min
    python bench/demo.py --task instructions --config bench/length_control.yaml \
        --out-json bench/results/demo-instructions-length.json      # the same with length control on
    python bench/readme.py                    # then the README's tables are rendered from the results

Wall time and peak RSS are the `prefloop demo` command's own (a child process, measured by the OS); the per-round
numbers come from the run's manifest: held-out accuracy, pairs kept, DPO seconds.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import machine

HERE = Path(__file__).parent


def pair_lengths(summary: dict) -> dict:
    """The pairs phase's length columns (mean chosen and rejected characters, share of pairs whose chosen is
    longer), for rounds that have them."""
    keys = ("mean_chosen_chars", "mean_rejected_chars", "chosen_longer_share")
    return {k: summary[k] for k in keys if k in summary}


def rounds_table(run_dir: Path) -> list[dict]:
    manifest = json.loads((run_dir / "manifest.json").read_text())
    out = []
    for k, entry in enumerate(manifest["rounds"]):
        phases = entry.get("phases", {})
        evals = phases.get("eval", {}).get("summary", {})
        out.append({
            "round": k,
            "accuracy": evals.get("accuracy"),
            "pairs": phases.get("pairs", {}).get("summary", {}).get("pairs"),
            "train_s": phases.get("train", {}).get("seconds"),
            "round_s": round(sum(p.get("seconds") or 0 for p in phases.values()), 1),
            "mean_answer_chars": evals.get("mean_length"),
            **pair_lengths(phases.get("pairs", {}).get("summary", {})),
        })
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="addition", choices=("addition", "instructions"))
    parser.add_argument("--backend", default=None)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--config", default=None, help="YAML over the demo's settings (prefloop demo --config).")
    parser.add_argument("--out-json", default=str(HERE / "results" / "demo.json"))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="prefloop-demo-"))
    command = [sys.executable, "-m", "prefloop.cli", "-q", "demo", "--task", args.task, "--out", str(work)]
    if args.backend is not None:
        command += ["--backend", args.backend]
    if args.rounds is not None:
        command += ["--rounds", str(args.rounds)]
    if args.config is not None:
        command += ["--config", args.config]
    started = time.monotonic()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    wall = time.monotonic() - started
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    flags = [f"--task {args.task}"] if args.task != "addition" else []
    flags += [f"--backend {args.backend}"] if args.backend is not None else []
    flags += [f"--rounds {args.rounds}"] if args.rounds is not None else []
    flags += [f"--config {args.config}"] if args.config is not None else []
    result = {"machine": machine(), "command": " ".join(["prefloop demo", *flags]), "wall_s": round(wall, 1),
              "peak_rss_mb": round(peak_mb), "rounds": rounds_table(work / "run")}
    plain = work / "run" / "plain_questions.json"
    if plain.exists():  # the instructions demo: general questions before and after, answered greedily
        result["plain_questions"] = json.loads(plain.read_text())
    # The run's report (answers of round 0 beside the latest, pairs, plain questions) is kept beside the numbers.
    shutil.copyfile(work / "run" / "report.md", Path(args.out_json).with_suffix(".report.md"))
    Path(args.out_json).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
