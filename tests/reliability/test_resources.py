"""Resources and sharding: a full disk mid-stage, and 1,003 prompts over 8 shards."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest

from prefloop.cli import main
from prefloop.store import read_records


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    from prefloop.tiny import save_tiny

    return str(save_tiny(tmp_path_factory.mktemp("tiny") / "model"))


def write_prompts(path: Path, n: int) -> list[str]:
    ids = [f"q{i:05d}" for i in range(n)]
    path.write_text("".join(json.dumps({"id": q, "prompt": f"{i}+{i % 7}="}) + "\n" for i, q in enumerate(ids)))
    return ids


def test_a_full_disk_stops_the_stage_with_one_line_and_keeps_what_was_written(tmp_path, tiny_model, monkeypatch,
                                                                                 capsys):
    """ENOSPC at the write call (injected: no size-limited mount is available to an unprivileged test) after some
    chunks: exit 2 with the file and the fix; every record already on disk intact; a re-run completes it."""
    import prefloop.store as store

    ids = write_prompts(tmp_path / "prompts.jsonl", 40)
    out = tmp_path / "candidates.jsonl"
    args = ["generate", "--model", tiny_model, "--prompts", str(tmp_path / "prompts.jsonl"), "--out", str(out),
            "--n", "1", "--max-new-tokens", "2", "--chunk-size", "8", "--dtype", "float32"]
    real_open, writes = open, {"n": 0}

    class FullDisk:
        """The store's file, until 20 records are written; then the disk is full."""

        def __init__(self, f):
            self.f = f

        def write(self, data):
            writes["n"] += 1
            if writes["n"] > 20:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

    def fake_open(path, mode="r", *a, **kw):
        f = real_open(path, mode, *a, **kw)
        return FullDisk(f) if str(path) == str(out) and "a" in mode else f

    monkeypatch.setattr(store, "open", fake_open, raising=False)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"cannot write {out}" in err and "disk is full" in err and "re-run" in err and "Traceback" not in err
    before = out.read_bytes()
    rows = [json.loads(line) for line in before.splitlines()]  # no torn line
    assert len(rows) == 20  # every record written before the disk filled, each a whole line
    monkeypatch.undo()
    assert main(args) == 0
    assert out.read_bytes().startswith(before)
    assert sorted(r["id"] for r in read_records(out)) == ids


def test_eight_shards_of_1003_prompts_are_disjoint_cover_everything_and_merge_idempotently(tmp_path, tiny_model):
    ids = write_prompts(tmp_path / "prompts.jsonl", 1003)
    shards = []
    for i in range(8):
        out = tmp_path / f"shard{i}.jsonl"
        assert main(["-q", "generate", "--model", tiny_model, "--prompts", str(tmp_path / "prompts.jsonl"),
                     "--out", str(out), "--n", "1", "--max-new-tokens", "1", "--temperature", "0",
                     "--batch-size", "512", "--chunk-size", "512", "--dtype", "float32", "--shard", f"{i}/8"]) == 0
        shards.append({r["id"] for r in read_records(out)})
    assert all(a.isdisjoint(b) for i, a in enumerate(shards) for b in shards[i + 1 :])
    assert set().union(*shards) == set(ids) and sum(map(len, shards)) == 1003
    merged, again = tmp_path / "all.jsonl", tmp_path / "again.jsonl"
    inputs = [str(tmp_path / f"shard{i}.jsonl") for i in range(8)]
    assert main(["merge", "--out", str(merged), *inputs]) == 0
    assert main(["merge", "--out", str(again), str(merged), *inputs]) == 0  # merging the merge changes nothing
    assert again.read_bytes() == merged.read_bytes()
    assert sorted(r["id"] for r in read_records(merged)) == sorted(ids)
