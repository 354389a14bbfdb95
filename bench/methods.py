"""One round of the addition demo per training method: dpo, orpo, kto, simpo and sft on the same samples.

    python bench/methods.py                      # -> bench/results/methods.json (a few minutes on 2 cores)
    python bench/readme.py                       # then the README's methods table is rendered from it

The demo's base model and data are built once; each method then runs `prefloop run` for one round with the demo's
settings (8 samples a prompt, best-vs-worst pairs, 5 epochs at lr 2.5e-3, batch 32, LoRA) and `train: {method: M}`.
Sampling is seeded per prompt, so every method trains on the same pairs; held-out accuracy is greedy on the demo's
500 held-out sums. Each method keeps TRL's meaning of beta (`prefloop/train/methods.py`).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from machine import machine

from prefloop.demo.addition import DEMO, HELDOUT, addition_config, write_once
from prefloop.demo.pretrain import pretrain
from prefloop.loop import run as run_loop
from prefloop.tasks.addition import make_prompts, split_size

HERE = Path(__file__).parent
# label -> train settings over the demo's. The demo's beta, 0.1, is also ORPO's and KTO's default; SimPO gets its
# own, 2.0 (`prefloop/train/methods.py`). The demo's lr (2.5e-3 for 5 epochs) was tuned for DPO + SFT; methods
# without an SFT term also run at the train stage's default lr.
RUNS = {
    "dpo": {"method": "dpo"},
    "orpo": {"method": "orpo"},
    "kto": {"method": "kto"},
    "kto, lr 5e-4": {"method": "kto", "lr": 5e-4},
    "simpo": {"method": "simpo", "beta": 2.0},
    "simpo, lr 5e-4": {"method": "simpo", "beta": 2.0, "lr": 5e-4},
    "sft": {"method": "sft"},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", default=";".join(RUNS), help="Semicolon list of RUNS labels.")
    parser.add_argument("--work", default=None, help="Working directory (re-running resumes).")
    parser.add_argument("--out-json", default=str(HERE / "results" / "methods.json"))
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="prefloop-methods-"))
    shared = work / "shared"
    if not (shared / "base" / "config.json").exists():
        pretrain(shared / "base")
    write_once(shared / "data" / "train.jsonl", make_prompts(split_size("train"), seed=0, split="train"))
    write_once(shared / "data" / "heldout.jsonl", make_prompts(HELDOUT, seed=0, split="heldout"))
    rows = []
    for label in args.runs.split(";"):
        root = work / label.replace(", ", "-").replace(" ", "")
        root.mkdir(parents=True, exist_ok=True)
        for name in ("base", "data"):
            if not (root / name).exists():
                (root / name).symlink_to(shared / name)
        config_file = root / "method.yaml"
        config_file.write_text(json.dumps({"train": RUNS[label]}), encoding="utf-8")
        started = time.monotonic()
        run_dir = run_loop(addition_config(str(root), rounds=1, config_file=str(config_file)))
        manifest = json.loads((run_dir / "manifest.json").read_text())
        phases = [r.get("phases", {}) for r in manifest["rounds"]]
        summary = json.loads((run_dir / "round_001" / "train" / "train_summary.json").read_text())
        rows.append({
            "method": label, "beta": summary["config"]["beta"], "lr": summary["config"]["lr"],
            "accuracy_before": phases[0]["eval"]["summary"]["accuracy"],
            "accuracy_after": phases[1]["eval"]["summary"]["accuracy"],
            "pairs": phases[1]["pairs"]["summary"]["pairs"], "rows_trained": summary["pairs"], "rows": summary["rows"],
            "steps": summary["steps"], "train_s": phases[1]["train"]["seconds"], "final_loss": summary["final_loss"],
            "wall_s": round(time.monotonic() - started, 1),
        })
        print(rows[-1], flush=True)
    train = {k: v for k, v in DEMO["train"].items() if k in ("lr", "batch_size", "epochs")}
    Path(args.out_json).write_text(json.dumps({"machine": machine(), "demo_train": train, "methods": rows},
                                              indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
