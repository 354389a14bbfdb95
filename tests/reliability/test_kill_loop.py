"""Kill `prefloop run` anywhere: SIGKILL the whole loop at seeded random moments across its phases, re-run the same
command, and check the finished run against what a run that was never killed must satisfy.

Each kill waits for a phase (generate, judge, pairs, train or eval, in a seeded order) to be running, plus a seeded
jitter, or lands at `uniform(0, T x what is left)` seconds after the start, T being an uninterrupted run's wall time.
The tally counts the phase each kill actually hit. After every kill:
`manifest.json` parses (it is replaced whole) and no phase is marked done whose output is missing; every JSONL file
in the run holds only whole lines with distinct ids, and the lines of every appendable output written before are a
byte prefix of what is there now. After the final re-run: the manifest says done for every phase; each round's
candidates and judgments hold every prompt id exactly once; the pairs equal, as a set, the pairs that `prefloop
pairs` makes from the final judgments (same seed: the loop's `seed + round`); training resumed or finished
with its adapter. Samples themselves are not compared with the straight run here: a train phase resumed from its
checkpoint can differ from the straight run by float rounding, and later rounds sample from that policy
(test_kill.py compares generate's samples, which per-prompt seeds make equal; docs/architecture.md, "The store").
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import pytest
import yaml
from killing import Tally, kill_at, log_tail, parse_lines, run_to_end, split_tail, survivors
from workdirs import loop_workdir

from prefloop.store import read_records

# The 10-kill variant is the soak: CI deselects it (-m "not soak", to stay under 45 minutes); run it with -m soak.
POINTS = [pytest.param(3, id="3-kills"),
          pytest.param(10, id="10-kills", marks=[pytest.mark.slow, pytest.mark.soak])]
PHASES = ["prompts", "generate", "judge", "pairs", "train", "eval"]
# What each kill waits for: a phase to be running (prompts is one atomic write, too quick to catch), or a delay.
KINDS = ("generate", "judge", "pairs", "train", "eval", "time")
APPENDED = ("prompts.jsonl", "candidates.jsonl", "judgments.jsonl", "eval_candidates.jsonl", "eval_judgments.jsonl")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return loop_workdir(tmp_path_factory.mktemp("kill-loop"))


def write_config(workdir: Path, out: Path) -> Path:
    values = {
        "out": str(out), "model": str(workdir / "model"), "prompts": str(workdir / "prompts.jsonl"),
        "eval_prompts": str(workdir / "heldout.jsonl"), "rounds": 2, "prompts_per_round": 24,
        "gen": {"n": 3, "max_new_tokens": 4, "chunk_size": 4, "dtype": "float32"},
        "judge": {"judge": "python", "reward_fn": str(workdir / "reward.py") + ":length"},
        "pairs": {"keep_truncated": True},
        "train": {"max_steps": 4, "batch_size": 4, "save_steps": 1, "logging_steps": 1,
                  "gradient_checkpointing": False, "dtype": "float32"},
    }
    path = out.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(values))
    return path


def running(root: Path) -> str | None:
    try:
        manifest = json.loads((root / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    return next((p for r in manifest["rounds"] for p, info in r["phases"].items() if info["status"] == "running"),
                None)


def left_to_do(root: Path) -> float:
    """The fraction of the loop's phases not yet done (the whole loop before its manifest exists)."""
    try:
        manifest = json.loads((root / "manifest.json").read_text())
    except (OSError, ValueError):
        return 1.0
    done = sum(info["status"] == "done" for r in manifest["rounds"] for info in r["phases"].values())
    return max(0.05, 1 - done / (1 + 2 * len(PHASES)))


def snapshot(root: Path) -> dict[str, bytes]:
    """The whole lines of every appendable output in the run, after checking each parses with distinct ids."""
    lines = {}
    for path in sorted(root.glob("round_*/*.jsonl")):
        complete, _ = split_tail(path.read_bytes())
        parse_lines(complete, str(path))
        if path.name in APPENDED:
            lines[str(path.relative_to(root))] = complete
    return lines


def check_manifest(root: Path) -> dict:
    manifest = json.loads((root / "manifest.json").read_text())  # whole, or the previous whole one
    for entry in manifest["rounds"]:
        d = root / f"round_{entry['round']:03d}"
        for phase, info in entry["phases"].items():
            if info["status"] == "done" and phase in ("generate", "judge", "pairs"):
                name = {"generate": "candidates.jsonl", "judge": "judgments.jsonl", "pairs": "pairs.jsonl"}[phase]
                assert (d / name).exists(), f"round {entry['round']}: {phase} is done but {name} is missing"
            if info["status"] == "done" and phase == "train":
                assert (d / "train" / "adapter" / "adapter_config.json").exists(), f"round {entry['round']}: train"
    return manifest


def pair_set(path: Path) -> set[tuple]:
    return {(p["id"], json.dumps(p["chosen"]), json.dumps(p["rejected"])) for p in read_records(path)}


def check_finished(root: Path, zygote, workdir: Path) -> int:
    """The checks on a finished run; returns the number of records compared."""
    manifest = check_manifest(root)
    assert manifest["status"] == "done"
    compared = 0
    for k in (1, 2):
        d = root / f"round_{k:03d}"
        assert all(manifest["rounds"][k]["phases"][p]["status"] == "done" for p in PHASES), manifest["rounds"][k]
        ids = sorted(r["id"] for r in read_records(d / "prompts.jsonl"))
        assert len(ids) == 24
        for name in ("candidates.jsonl", "judgments.jsonl"):
            rows = parse_lines((d / name).read_bytes(), str(d / name))
            assert sorted(r["id"] for r in rows) == ids, name
            compared += len(rows)
        again = d.parent / f"repaired_pairs_{k}.jsonl"
        run_to_end(zygote, ["pairs", "--judgments", str(d / "judgments.jsonl"), "--out", str(again),
                            "--keep-truncated", "--round", str(k), "--seed", str(k)], d.parent / f"pairs_{k}.log")
        assert pair_set(d / "pairs.jsonl") == pair_set(again), f"round {k}: pairs differ from their judgments'"
        compared += len(read_records(again))
        assert (d / "train" / "adapter" / "adapter_config.json").exists()
        assert len(read_records(d / "eval_judgments.jsonl")) == 16
    return compared


@pytest.mark.parametrize("points", POINTS)
def test_kill_the_loop_anywhere_then_resume(workdir, zygote, tmp_path, points, capsys):
    rng = random.Random(points)
    tally = Tally("prefloop run (2 rounds, every phase)", points)
    straight = tmp_path / "straight"
    seconds = run_to_end(zygote, ["run", "--config", str(write_config(workdir, straight))], tmp_path / "straight.log")
    check_finished(straight, zygote, workdir)

    root, seq = tmp_path / "killed0", 0
    config = write_config(workdir, root)
    before: dict[str, bytes] = {}
    kinds = [KINDS[i % len(KINDS)] for i in range(points)]
    rng.shuffle(kinds)
    while tally.landed < points:
        assert tally.tried < 3 * points + 3, f"{tally.tried} kills tried, {tally.landed} landed"
        kind = kinds[tally.landed]
        log = tmp_path / f"run{tally.tried}.log"
        tally.tried += 1
        job = zygote.start(["run", "--config", str(config)], log)
        if kind == "time":  # anywhere, start-up included
            killed = kill_at(job, log, rng.uniform(0, seconds * left_to_do(root)))
        else:  # once the phase is running (in whichever round), after a seeded jitter
            killed = kill_at(job, log, rng.uniform(0, 0.02), lambda kind=kind, root=root: running(root) == kind)
        deadline = time.monotonic() + 60
        while survivors(job.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not survivors(job.pid)
        manifest = check_manifest(root) if (root / "manifest.json").exists() else None
        now = snapshot(root) if root.exists() else {}
        for name, lines in before.items():
            assert now.get(name, b"").startswith(lines), f"{name}: records written before kill {tally.tried} changed"
        before = now
        if killed:
            tally.landed_at(running(root) or "start-up")
        if manifest and manifest["status"] == "done":  # finished before the kill: check, start a new sequence
            tally.records += check_finished(root, zygote, workdir)
            seq += 1
            root = tmp_path / f"killed{seq}"
            config, before = write_config(workdir, root), {}
    run_to_end(zygote, ["run", "--config", str(config)], tmp_path / "final.log")
    for name, lines in before.items():
        assert (root / name).read_bytes().startswith(lines), name
    tally.records += check_finished(root, zygote, workdir)
    tally.sequences = seq + 1
    tally.report(capsys)
    assert log_tail(tmp_path / "final.log", 100000).count("Traceback") == 0
