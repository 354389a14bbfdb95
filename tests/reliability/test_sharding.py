"""Sharding end to end: 1,003 prompts generated as 8 `--shard i/8` workers (hf backend, tiny model, one token
each), then `prefloop merge`.

Shards are disjoint and their union is every prompt id; merging is idempotent (merge twice, or merge the merge
with the shards again: identical bytes) and does not depend on the order of its inputs beyond the order of lines;
a shard killed mid-write merges without its torn line (counted) and, once resumed, fills the merge in. The
hash-based assignment itself is unit-tested in tests/prefloop/test_store.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import prefloop.gen.stage as gen_stage
from prefloop.cli import main
from prefloop.store import read_records, shard_of

N, SHARDS = 1003, 8


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> tuple[Path, list[str], list[str]]:
    """(folder, prompt ids, the generate arguments common to every shard), with shard{i}.jsonl for i < 8."""
    import torch

    from prefloop.demo.tiny import save_tiny

    mp = pytest.MonkeyPatch()
    mp.setenv("PREFLOOP_NO_BAR", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("shards")
    model = save_tiny(d / "model")
    ids = [f"q{i:05d}" for i in range(N)]
    (d / "prompts.jsonl").write_text("".join(json.dumps({"id": q, "prompt": f"{i}+{i % 7}="}) + "\n"
                                             for i, q in enumerate(ids)))
    common = ["-q", "generate", "--model", str(model), "--prompts", str(d / "prompts.jsonl"), "--n", "1",
              "--max-new-tokens", "1", "--temperature", "0", "--batch-size", "512", "--chunk-size", "64",
              "--dtype", "float32"]
    for i in range(SHARDS):
        assert main([*common, "--out", str(d / f"shard{i}.jsonl"), "--shard", f"{i}/{SHARDS}"]) == 0
    yield d, ids, common
    torch.set_num_threads(threads)
    mp.undo()


def shard_paths(d: Path) -> list[str]:
    return [str(d / f"shard{i}.jsonl") for i in range(SHARDS)]


def test_shards_are_disjoint_and_together_hold_every_prompt(shards):
    """Each shard holds exactly the ids that hash to it, each once; no id is in two shards; together they hold all
    1,003; every shard finished, its summary counting exactly its prompts."""
    d, ids, _ = shards
    sets = []
    for i in range(SHARDS):
        rows = read_records(d / f"shard{i}.jsonl")
        got = [r["id"] for r in rows]
        assert len(got) == len(set(got)) and got  # each once, and no shard empty
        assert {shard_of(rid, SHARDS) for rid in got} == {i}
        summary = json.loads((d / f"shard{i}.summary.json").read_text())
        assert summary["status"] == "done" and summary["prompts"] == summary["written"] == len(got)
        sets.append(set(got))
    assert all(a.isdisjoint(b) for i, a in enumerate(sets) for b in sets[i + 1 :])
    assert set().union(*sets) == set(ids) and sum(map(len, sets)) == N


def test_merge_is_idempotent(shards, tmp_path, capsys):
    """merge twice -> identical bytes; merging the merge with all shards again -> identical bytes (every row a
    counted duplicate, none a conflict); shards in reverse order -> the same lines; the inputs are never modified."""
    d, ids, _ = shards
    inputs = shard_paths(d)
    before = {p: Path(p).read_bytes() for p in inputs}
    first, second, again, reverse = (tmp_path / f"{name}.jsonl" for name in ("first", "second", "again", "reverse"))
    assert main(["merge", "--out", str(first), *inputs]) == 0
    assert main(["merge", "--out", str(second), *inputs]) == 0
    assert main(["merge", "--out", str(again), str(first), *inputs]) == 0
    assert main(["merge", "--out", str(reverse), *reversed(inputs)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"{first}: {N} records (0 duplicates, 0 conflicts)"
    assert out[2] == f"{again}: {N} records ({N} duplicates, 0 conflicts)"
    assert first.read_bytes() == second.read_bytes() == again.read_bytes()
    assert sorted(reverse.read_bytes().splitlines()) == sorted(first.read_bytes().splitlines())
    assert sorted(r["id"] for r in read_records(first)) == ids
    assert {p: Path(p).read_bytes() for p in inputs} == before


def test_a_shard_killed_mid_write_merges_without_its_torn_line_then_resumes(shards, tmp_path, capsys, monkeypatch):
    """A shard whose worker was killed mid-line: merge skips (and reports) the torn line and leaves the shard as it
    is; the worker's re-run cuts the tail, regenerates only what is missing, and the next merge holds every id.
    The same worker restarted as a shard of another split (`--shard 3/9`) is refused as config drift."""
    d, ids, common = shards
    monkeypatch.setenv("PREFLOOP_NO_BAR", "1")
    shard = tmp_path / "shard3.jsonl"
    lines = (d / "shard3.jsonl").read_bytes().splitlines(keepends=True)
    torn = b"".join(lines[:-5]) + lines[-5][:40]  # killed while writing its fifth-to-last record
    shard.write_bytes(torn)
    shutil.copy(d / "shard3.config.yaml", tmp_path / "shard3.config.yaml")
    inputs = [p if i != 3 else str(shard) for i, p in enumerate(shard_paths(d))]

    merged = tmp_path / "merged.jsonl"
    assert main(["merge", "--out", str(merged), *inputs]) == 0
    assert capsys.readouterr().out.strip() == f"{merged}: {N - 5} records (0 duplicates, 0 conflicts, 1 torn line skipped)"
    assert shard.read_bytes() == torn  # merge reads, never repairs: the worker may still be writing

    assert main([*common, "--out", str(shard), "--shard", "3/9"]) == 2
    assert "(changed: shard)" in capsys.readouterr().err
    calls = []
    real = gen_stage.load_generator

    def counting(*a, **k):
        generator = real(*a, **k)
        inner = generator.generate
        generator.generate = lambda prompts, n, sampling: calls.append(len(prompts)) or inner(prompts, n, sampling)
        return generator

    monkeypatch.setattr(gen_stage, "load_generator", counting)
    assert main([*common, "--out", str(shard), "--shard", f"3/{SHARDS}"]) == 0
    assert sum(calls) == 5  # only the missing records were generated
    assert shard.read_bytes().startswith(b"".join(lines[:-5]))
    assert main(["merge", "--out", str(merged), *inputs]) == 0
    assert sorted(r["id"] for r in read_records(merged)) == ids
