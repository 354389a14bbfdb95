"""The crash-safe JSONL store (docs/architecture.md "The store"): append/commit/reopen, torn tails, ids, atomic writes, shards, merge."""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from prefloop import store
from prefloop.store import (
    JsonlStore,
    atomic_dir,
    atomic_write,
    dumps,
    merge,
    parse_shard,
    read_ids,
    repair_tail,
    shard_of,
)


def _rec(i: int | str, **extra) -> dict:
    return {"id": str(i), "prompt": f"prompt {i}", **extra}


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def _all_parse(path: Path) -> list[dict]:
    """Every line of `path` is newline-terminated JSON; return the records."""
    data = path.read_bytes()
    assert data == b"" or data.endswith(b"\n"), f"{path} does not end on a clean line: {data[-80:]!r}"
    return [json.loads(line) for line in data.splitlines()]


# --- append / commit / reopen -----------------------------------------------------------------------------------


def test_append_commit_reopen_keeps_bytes(tmp_path):
    """Records written, committed and closed are on disk byte-for-byte; reopening neither changes them nor loses ids."""
    path = tmp_path / "sub" / "out.jsonl"  # parent dir is created
    records = [_rec(i, score=i / 3, text='café ☕ "q" \\ \n') for i in range(5)]
    with JsonlStore(path) as s:
        for r in records[:3]:
            s.append(r)
        s.commit()
        s.extend(records[3:])
    expected = b"".join(dumps(r).encode("utf-8") for r in records)
    assert path.read_bytes() == expected
    with JsonlStore(path) as s:
        assert s.done == {r["id"] for r in records}
    assert path.read_bytes() == expected
    assert not Path(f"{path}.torn").exists()
    assert [json.loads(line) for line in expected.splitlines()] == records


def test_dumps_puts_id_first_and_keeps_unicode(tmp_path):
    """`dumps` writes one newline-terminated UTF-8 line with `id` as the first key, non-ASCII unescaped."""
    line = dumps({"prompt": "héllo", "id": "x"})
    assert line.endswith("\n") and line.count("\n") == 1
    assert line.startswith('{"id": "x"')
    assert "héllo" in line


def test_dumps_refuses_missing_id():
    """A record without an `id` cannot be stored (resume is keyed by id)."""
    with pytest.raises(ValueError, match="id"):
        dumps({"prompt": "x"})


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_dumps_refuses_nan(bad):
    """NaN/Infinity are not JSON: `dumps` refuses them instead of writing an unreadable line."""
    with pytest.raises(ValueError):
        dumps({"id": "a", "score": bad})


def test_append_nan_writes_nothing_and_id_stays_free(tmp_path):
    """A record refused by `dumps` leaves the file untouched and its id unclaimed, so a fixed record can follow."""
    path = tmp_path / "out.jsonl"
    with JsonlStore(path) as s:
        s.append(_rec("a"))
        with pytest.raises(ValueError):
            s.append({"id": "b", "scores": [1.0, math.nan]})
        assert "b" not in s.done
        s.append({"id": "b", "scores": [1.0, None]})
    assert [r["id"] for r in _all_parse(path)] == ["a", "b"]


def test_append_same_id_twice_raises(tmp_path):
    """Appending an id that is already stored raises and writes nothing, in the same session and after reopen."""
    path = tmp_path / "out.jsonl"
    with JsonlStore(path) as s:
        s.append(_rec("a"))
        with pytest.raises(ValueError, match="already stored"):
            s.append(_rec("a", other=1))
    before = path.read_bytes()
    with JsonlStore(path) as s:
        with pytest.raises(ValueError, match="already stored"):
            s.append(_rec("a"))
    assert path.read_bytes() == before
    assert len(_lines(path)) == 1


def test_empty_file_opens_clean(tmp_path):
    """An empty file is a valid empty store: nothing cut, no `.torn`, appends work."""
    path = tmp_path / "out.jsonl"
    path.write_bytes(b"")
    assert repair_tail(path) == 0
    with JsonlStore(path) as s:
        assert s.done == set()
        s.append(_rec(1))
    assert not Path(f"{path}.torn").exists()
    assert [r["id"] for r in _all_parse(path)] == ["1"]


def test_missing_file_repair_is_noop(tmp_path):
    """`repair_tail` and `read_ids` on a file that does not exist do nothing."""
    path = tmp_path / "nope.jsonl"
    assert repair_tail(path) == 0
    assert read_ids(path) == set()
    assert not path.exists()


# --- torn tails -------------------------------------------------------------------------------------------------

GOOD = [dumps(_rec(i)).encode("utf-8") for i in range(3)]
HALF = dumps(_rec(99, text="x" * 50)).encode("utf-8")[:30]  # a write interrupted mid-line
PARTIAL_UTF8 = b'{"id": "u", "t": "caf' + "é".encode()[:1]  # ends inside a 2-byte sequence


@pytest.mark.parametrize(
    "tail",
    [
        pytest.param(HALF, id="half-line-no-newline"),
        pytest.param(PARTIAL_UTF8, id="partial-utf8-no-newline"),
        pytest.param(PARTIAL_UTF8 + b'"}\n', id="partial-utf8-last-line"),
        pytest.param(b"\x00\x00garbage{{{\n", id="garbage-last-line"),
        pytest.param(GOOD[0][:-1].replace(b'"0"', b'"7"'), id="valid-json-without-newline"),
    ],
)
def test_torn_tail_is_cut_kept_and_appends_start_clean(tmp_path, caplog, tail):
    """A torn tail is cut off on open, its bytes kept in `<file>.torn`, the cut logged, and new rows start clean."""
    path = tmp_path / "out.jsonl"
    body = b"".join(GOOD)
    path.write_bytes(body + tail)
    with caplog.at_level(logging.WARNING, logger="prefloop.store"):
        with JsonlStore(path) as s:
            assert s.done == {"0", "1", "2"}
            s.append(_rec("new"))
    assert "torn" in caplog.text
    assert Path(f"{path}.torn").read_bytes() == tail
    assert path.read_bytes() == body + dumps(_rec("new")).encode("utf-8")
    assert [r["id"] for r in _all_parse(path)] == ["0", "1", "2", "new"]


def test_garbage_last_line_then_half_line_cuts_both(tmp_path):
    """A garbage last complete line followed by a half line: both are cut, the good lines before them stay."""
    path = tmp_path / "out.jsonl"
    path.write_bytes(GOOD[0] + b"not json\n" + HALF)
    cut = repair_tail(path)
    assert cut == len(b"not json\n" + HALF)
    assert path.read_bytes() == GOOD[0]


def test_file_without_any_newline_is_all_torn(tmp_path):
    """A file with no newline at all holds no complete line: all of it goes to `.torn` and the store starts empty."""
    path = tmp_path / "out.jsonl"
    path.write_bytes(HALF)
    with JsonlStore(path) as s:
        assert s.done == set()
        s.append(_rec("a"))
    assert Path(f"{path}.torn").read_bytes() == HALF
    assert [r["id"] for r in _all_parse(path)] == ["a"]


def test_repeated_repairs_accumulate_in_torn(tmp_path):
    """Each cut is appended to `.torn`, so two crashes in a row lose nothing."""
    path = tmp_path / "out.jsonl"
    path.write_bytes(GOOD[0] + b"first-fragment")
    repair_tail(path)
    path.write_bytes(path.read_bytes() + b"second-fragment")
    repair_tail(path)
    assert Path(f"{path}.torn").read_bytes() == b"first-fragmentsecond-fragment"
    assert path.read_bytes() == GOOD[0]


def test_whole_file_is_not_touched(tmp_path):
    """`repair_tail` on a whole file cuts nothing and creates no `.torn`."""
    path = tmp_path / "out.jsonl"
    path.write_bytes(b"".join(GOOD))
    assert repair_tail(path) == 0
    assert path.read_bytes() == b"".join(GOOD)
    assert not Path(f"{path}.torn").exists()


def test_tail_scan_crosses_block_boundary(tmp_path):
    """A last line longer than the 64 KiB scan block is still found and judged whole."""
    path = tmp_path / "out.jsonl"
    big = dumps({"id": "big", "text": "y" * 200_000}).encode()
    path.write_bytes(GOOD[0] + big + b"z" * 100_000)  # torn tail also longer than a block
    assert repair_tail(path) == 100_000
    assert path.read_bytes() == GOOD[0] + big
    assert read_ids(path) == {"0", "big"}


# --- ids --------------------------------------------------------------------------------------------------------

ODD_IDS = [
    'with "quotes" inside',
    "back\\slash and \\u0041 literal",
    "new\nline\ttab",
    "unicode café 🍕 中文",
    '{"id": "fake"}',
    "x" * 700,  # longer than the fast path's 512-byte window
    "é" * 300,  # 600 bytes: the window cuts inside a multi-byte character
    "a" * 511 + "é" + "b" * 5,  # a 2-byte character straddling the window edge
    "1234",
]


def test_read_ids_matches_odd_ids(tmp_path):
    """`read_ids` returns exactly the stored ids, for ids with quotes, escapes, unicode and > 512 bytes."""
    path = tmp_path / "out.jsonl"
    with JsonlStore(path) as s:
        for rid in ODD_IDS:
            s.append({"id": rid, "prompt": "p", "pad": "z" * 10})
    assert read_ids(path) == set(ODD_IDS)
    with JsonlStore(path) as s:
        assert s.done == set(ODD_IDS)
        for rid in ODD_IDS:
            with pytest.raises(ValueError):
                s.append({"id": rid})


def test_line_id_fallback_for_foreign_key_order(tmp_path):
    """Lines not written by the store (id not first) still yield their id via the full-parse fallback."""
    path = tmp_path / "out.jsonl"
    path.write_bytes(b'{"prompt": "p", "id": "late"}\n{"id":"compact"}\n')
    assert read_ids(path) == {"late", "compact"}


# --- atomic writes ----------------------------------------------------------------------------------------------


def _no_tmp(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_atomic_write_replaces_and_leaves_no_tmp(tmp_path):
    """`atomic_write` replaces the content whole (str or bytes) and leaves no temp file."""
    path = tmp_path / "summary.json"
    atomic_write(path, "old")
    atomic_write(path, b"new \xc3\xa9")
    assert path.read_bytes() == b"new \xc3\xa9"
    assert _no_tmp(tmp_path) == []


def test_atomic_write_keeps_old_content_when_replace_fails(tmp_path, monkeypatch):
    """If the final `os.replace` raises, the old content stays and the temp file is removed."""
    path = tmp_path / "summary.json"
    path.write_text("old")

    def boom(*a, **k):
        raise OSError("disk gone")

    monkeypatch.setattr(store.os, "replace", boom)
    with pytest.raises(OSError, match="disk gone"):
        atomic_write(path, "new content")
    monkeypatch.undo()
    assert path.read_text() == "old"
    assert _no_tmp(tmp_path) == []


def test_atomic_write_keeps_old_content_when_write_fails_midway(tmp_path, monkeypatch):
    """If the write fails after some bytes hit the temp file (fsync raises), old content stays, no temp remains."""
    path = tmp_path / "summary.json"
    path.write_text("old")

    def boom(fd):
        raise OSError("fsync failed")

    monkeypatch.setattr(store.os, "fsync", boom)
    with pytest.raises(OSError, match="fsync failed"):
        atomic_write(path, "x" * 100_000)
    monkeypatch.undo()
    assert path.read_text() == "old"
    assert _no_tmp(tmp_path) == []


def test_atomic_write_interrupt_is_cleaned(tmp_path, monkeypatch):
    """A KeyboardInterrupt during the write (BaseException) also leaves the old file and no temp."""
    path = tmp_path / "summary.json"
    path.write_text("old")

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(store.os, "replace", interrupt)
    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, "new")
    monkeypatch.undo()
    assert path.read_text() == "old"
    assert _no_tmp(tmp_path) == []


def test_atomic_dir_removes_temp_on_exception(tmp_path):
    """An exception inside `atomic_dir` removes the temp dir and leaves an existing destination as it was."""
    dest = tmp_path / "model"
    dest.mkdir()
    (dest / "weights.bin").write_text("v1")
    with pytest.raises(RuntimeError):
        with atomic_dir(dest) as tmp:
            (tmp / "weights.bin").write_text("half")
            raise RuntimeError("training crashed")
    assert (dest / "weights.bin").read_text() == "v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_atomic_dir_creates_and_replaces(tmp_path):
    """`atomic_dir` creates a new dir, and replaces an existing one whole (no stale files, no `.old`/temp left)."""
    dest = tmp_path / "model"
    with atomic_dir(dest) as tmp:
        (tmp / "a.txt").write_text("1")
        (tmp / "stale.txt").write_text("stale")
    assert sorted(p.name for p in dest.iterdir()) == ["a.txt", "stale.txt"]
    with atomic_dir(dest) as tmp:
        (tmp / "a.txt").write_text("2")
    assert sorted(p.name for p in dest.iterdir()) == ["a.txt"]
    assert (dest / "a.txt").read_text() == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


# --- sharding ---------------------------------------------------------------------------------------------------


def test_shards_are_disjoint_and_cover_everything():
    """1,003 ids over 8 shards: every id lands in exactly one shard, the union is all ids, no shard is empty."""
    ids = [f"id-{i}" for i in range(1003)]
    shards = {i: {rid for rid in ids if shard_of(rid, 8) == i} for i in range(8)}
    assert sum(len(s) for s in shards.values()) == len(ids)
    assert set().union(*shards.values()) == set(ids)
    for i in range(8):
        for j in range(i + 1, 8):
            assert not shards[i] & shards[j]
    assert all(shards.values())
    assert all(shard_of(rid, 1) == 0 for rid in ids)


def test_shard_of_is_stable_across_processes():
    """`shard_of` does not depend on Python's per-process hash seed (workers on other machines agree)."""
    ids = ["a", "b", "café", "x" * 100]
    here = [shard_of(rid, 7) for rid in ids]
    code = f"from prefloop.store import shard_of; print([shard_of(r, 7) for r in {ids!r}])"
    for seed in ("1", "2"):
        out = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONHASHSEED": seed},
        )
        assert json.loads(out.stdout) == here


@pytest.mark.parametrize(
    "spec,expected", [("0/1", (0, 1)), ("3/8", (3, 8)), (" 7/8 ", (7, 8)), (None, None), ("", None)]
)
def test_parse_shard_valid(spec, expected):
    """`parse_shard` reads 'i/n' (0-based) and treats an empty spec as no sharding."""
    assert parse_shard(spec) == expected


@pytest.mark.parametrize("spec", ["8/8", "a/b", "1", "-1/4", "0/0", "1/2/3", "1.5/4"])
def test_parse_shard_errors_name_the_flag(spec):
    """A malformed or out-of-range shard spec raises an error naming `--shard` with an example."""
    with pytest.raises(ValueError, match="--shard") as e:
        parse_shard(spec)
    assert "e.g." in str(e.value)


# --- merge ------------------------------------------------------------------------------------------------------


def _write_shards(tmp_path: Path, records: list[dict], n: int) -> list[Path]:
    paths = []
    for i in range(n):
        path = tmp_path / f"shard{i}.jsonl"
        with JsonlStore(path) as s:
            s.extend(r for r in records if shard_of(r["id"], n) == i)
        paths.append(path)
    return paths


def test_merge_of_shards_is_the_union_and_idempotent(tmp_path):
    """Merging shard files gives every record exactly once, byte-for-byte; merging again gives identical bytes."""
    records = [_rec(f"id-{i}", value=i) for i in range(1003)]
    paths = _write_shards(tmp_path, records, 8)
    out = tmp_path / "merged.jsonl"
    stats = merge(paths, out)
    assert stats == {"records": 1003, "duplicates": 0, "conflicts": 0, "torn": 0}
    first = out.read_bytes()
    assert sorted(first.splitlines(keepends=True)) == sorted(dumps(r).encode() for r in records)
    stats2 = merge(paths, out)
    assert stats2 == stats
    assert out.read_bytes() == first
    # Merging the merged file with its own inputs adds nothing new.
    stats3 = merge([out, *paths], tmp_path / "again.jsonl")
    assert stats3 == {"records": 1003, "duplicates": 1003, "conflicts": 0, "torn": 0}
    assert (tmp_path / "again.jsonl").read_bytes() == first
    assert _no_tmp(tmp_path) == []


def test_merge_counts_duplicates_and_conflicts_first_wins(tmp_path):
    """Identical repeats count as duplicates, same id with different content as conflicts; the first row is kept."""
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    with JsonlStore(a) as s:
        s.extend([_rec("x", v=1), _rec("y")])
    with JsonlStore(b) as s:
        s.extend([_rec("x", v=2), _rec("y"), _rec("z")])
    out = tmp_path / "m.jsonl"
    assert merge([a, b], out) == {"records": 3, "duplicates": 1, "conflicts": 1, "torn": 0}
    recs = {r["id"]: r for r in _all_parse(out)}
    assert recs["x"]["v"] == 1
    assert set(recs) == {"x", "y", "z"}


def test_merge_skips_torn_lines_and_leaves_inputs_alone(tmp_path):
    """A shard killed (or still being written) mid-line merges without its fragment, counted as torn; inputs untouched."""
    a = tmp_path / "a.jsonl"
    original = b"".join(GOOD) + HALF
    a.write_bytes(original)
    out = tmp_path / "m.jsonl"
    stats = merge([a], out)
    assert stats["records"] == 3 and stats["torn"] == 1
    assert out.read_bytes() == b"".join(GOOD)
    assert a.read_bytes() == original
    assert not Path(f"{a}.torn").exists()
