"""`prefloop judge-eval` on the judges of bench/judges_real.py: each SmolLM2 judge against the instruction verifier.

    python bench/judges_real.py --work /tmp/prefloop-judges     # the judgments (about 20 minutes)
    python bench/judge_eval.py --work /tmp/prefloop-judges      # -> bench/results/judge-eval.json (seconds)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from machine import machine

HERE = Path(__file__).parent
JUDGES = {"llm pointwise": "llm-pointwise.jsonl", "llm pairwise": "llm-pairwise.jsonl",
          "CAI feedback": "cai-feedback.jsonl"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", required=True, help="bench/judges_real.py's working directory.")
    parser.add_argument("--out-json", default=str(HERE / "results" / "judge-eval.json"))
    args = parser.parse_args()
    work, rows = Path(args.work), {}
    for name, file in JUDGES.items():
        out = work / f"eval-{file.removesuffix('.jsonl')}.json"
        command = ["judge-eval", "--judgments", str(work / file), "--gold", str(work / "verifier.jsonl"), "--out",
                   str(out)]
        subprocess.run([sys.executable, "-m", "prefloop.cli", *command], check=True)
        rows[name] = {"command": "prefloop " + " ".join(command), **json.loads(out.read_text())}
    Path(args.out_json).write_text(json.dumps({"machine": machine(), "judges": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
