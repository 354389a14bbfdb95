"""A full disk mid-stage, injected as `OSError(ENOSPC)` at the store's write call: it runs anywhere, while the real
full tmpfs in test_disk.py needs the privilege to mount one (sharding is tested in test_sharding.py)."""

from __future__ import annotations

import errno
import json
from pathlib import Path

from prefloop.cli import main
from prefloop.store import read_records


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
