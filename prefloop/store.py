"""The crash-safe JSONL store: the only code in prefloop that writes records.

Guarantees (each is tested in tests/prefloop/test_store.py and the kill tests):
- Append-only. A record is serialised whole and written with one `write()` of a complete line; the file is
  flushed after every chunk and fsynced at chunk boundaries, so a crash loses at most the chunk in flight.
- On open for append, a torn tail (bytes after the last newline, or a last line that does not parse) is cut off.
  The cut bytes are kept in `<file>.torn` and the cut is logged: new rows never join a fragment, nothing is lost.
- Resume is keyed by `id` (the first key of every record, so ids are read without parsing whole lines); records
  already on disk are kept byte-for-byte.
- A failed append (a full disk, a read-only file system) is cut back to the end of the last whole record before the
  error is raised, so a full disk never leaves a torn line behind either.
- Outputs that are not appendable (configs, summaries, manifests, model dirs) go through `atomic_write` /
  `atomic_dir`: written beside their destination as `.<name>.<pid>.<random>.tmp`, then `os.replace`d into place.
  A temp left by a killed writer (its pid is gone) is removed, and logged, by the next write to that destination;
  a directory swap interrupted between its two renames is undone (the old copy restored) the same way.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from prefloop.errors import PrefloopError

log = logging.getLogger(__name__)

_ID_PREFIX = b'{"id": '
_decoder = json.JSONDecoder()


class InputError(PrefloopError, ValueError):
    """Bad input: the message names the file, the line, and the fix. Raised before any work starts."""


def dumps(record: dict[str, Any]) -> str:
    """Serialise one record as a JSONL line with `id` first (so resume can read ids cheaply)."""
    if "id" not in record:
        raise ValueError(f"record has no 'id': {str(record)[:200]}")
    ordered = {"id": record["id"], **{k: v for k, v in record.items() if k != "id"}}
    # allow_nan=False: NaN/Infinity are not JSON; a NaN score must be caught upstream as a failure, not written.
    return json.dumps(ordered, ensure_ascii=False, allow_nan=False) + "\n"


def _line_id(line: bytes) -> str:
    """The `id` of a store-written line, decoding only its prefix; falls back to a full parse."""
    if line.startswith(_ID_PREFIX):
        head = line[len(_ID_PREFIX) : len(_ID_PREFIX) + 512].decode("utf-8", errors="ignore")
        try:
            value, _ = _decoder.raw_decode(head)
            return str(value)
        except json.JSONDecodeError:
            pass
    return str(json.loads(line)["id"])


def repair_tail(path: str | Path) -> int:
    """Cut a torn tail off `path` in place; return the number of bytes cut (0 if the file was whole).

    A tail is torn when bytes follow the last newline (a write interrupted mid-line) or when the last complete
    line is not valid JSON (e.g. a partial UTF-8 sequence or garbage). The cut bytes are appended to
    `<path>.torn` so nothing is silently destroyed.
    """
    path = Path(path)
    if not path.exists():
        return 0
    size = path.stat().st_size
    if size == 0:
        return 0
    with open(path, "rb") as f:
        # Scan back from the end for the start of the last line; tails are small, read in blocks.
        keep = _last_good_offset(f, size)
    if keep == size:
        return 0
    with open(path, "rb") as f:
        f.seek(keep)
        cut = f.read()
    with open(f"{path}.torn", "ab") as torn:
        torn.write(cut)
        torn.flush()
        os.fsync(torn.fileno())
    with open(path, "r+b") as f:
        f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())
    log.warning("%s: cut a torn tail of %d bytes (kept in %s.torn)", path, len(cut), path)
    return len(cut)


def _rfind_newline(f, end: int) -> int:
    """Offset of the last newline before `end`, or -1; reads backwards in blocks so huge files cost little."""
    pos = end
    while pos > 0:
        start = max(0, pos - (1 << 16))
        f.seek(start)
        i = f.read(pos - start).rfind(b"\n")
        if i >= 0:
            return start + i
        pos = start
    return -1


def _last_good_offset(f, size: int) -> int:
    """Offset just past the last newline-terminated line, or before it if that line does not parse as JSON."""
    nl = _rfind_newline(f, size)
    if nl < 0:
        return 0  # not one complete line: all of it is torn
    prev = _rfind_newline(f, nl)
    f.seek(prev + 1)
    last = f.read(nl - prev - 1)
    if last.strip() and not _parses(last):
        return prev + 1
    return nl + 1


def _parses(line: bytes) -> bool:
    try:
        json.loads(line.decode("utf-8"))
        return True
    except (UnicodeDecodeError, json.JSONDecodeError):
        return False


def read_ids(path: str | Path) -> set[str]:
    """Ids of the records in a store file (after tail repair by the caller). Cost ~ file size, not JSON parsing."""
    path = Path(path)
    ids: set[str] = set()
    if not path.exists():
        return ids
    with open(path, "rb") as f:
        for line in f:
            if line.endswith(b"\n") and line.strip():
                ids.add(_line_id(line))
    return ids


def iter_records(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield `(line_number, record)` from a JSONL file, raising `InputError` naming file:line on a bad line."""
    path = Path(path)
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise InputError(
                    f"{path}:{lineno}: not valid UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1}). "
                    "Fix: re-encode the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)."
                ) from None
            try:
                record = json.loads(text)
            except json.JSONDecodeError as e:
                raise InputError(
                    f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno}). "
                    "Fix: each line must be one complete JSON object."
                ) from None
            if not isinstance(record, dict):
                raise InputError(
                    f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}. "
                    'Fix: write one object per line, e.g. {"prompt": "..."}.'
                )
            yield lineno, record


def read_records(path: str | Path) -> list[dict[str, Any]]:
    return [record for _, record in iter_records(path)]


class JsonlStore:
    """An append-only JSONL file with id-keyed, exactly-once resume.

    Opening repairs a torn tail; `done` holds the ids already on disk; `append` writes whole lines and refuses an
    id that is already there (so a resumed stage cannot duplicate a row); `commit` fsyncs (call it per chunk).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        repair_tail(self.path)
        self.done: set[str] = read_ids(self.path)
        # Unbuffered binary append: every `write` below is one syscall carrying one complete line.
        self._f = open(self.path, "ab", buffering=0)
        self._end = self._f.seek(0, os.SEEK_END)  # where the last whole record ends

    def append(self, record: dict[str, Any]) -> None:
        rid = str(record["id"])
        if rid in self.done:
            raise ValueError(f"{self.path}: id {rid!r} is already stored; refusing to write it twice")
        line = dumps(record).encode("utf-8")
        try:
            written = self._f.write(line)
        except OSError as e:  # name the file (a bare write error does not), keep errno for the CLI's message
            self._cut_back()
            raise OSError(e.errno, e.strerror, str(self.path)) from e
        if written != len(line):  # a short write on a regular file means the disk is full
            self._cut_back()
            raise OSError(errno.ENOSPC, f"No space left on device (short write: {written} of {len(line)} bytes)",
                          str(self.path))
        self._end += written
        self.done.add(rid)

    def _cut_back(self) -> None:
        """Drop the part of a line a failed write left behind (truncating needs no free space). If even that fails,
        the next open cuts the fragment as a torn tail."""
        with contextlib.suppress(OSError):
            os.ftruncate(self._f.fileno(), self._end)

    def extend(self, records: Iterable[dict[str, Any]]) -> None:
        for record in records:
            self.append(record)
        self.commit()

    def commit(self) -> None:
        try:
            os.fsync(self._f.fileno())
        except OSError as e:
            raise OSError(e.errno, e.strerror, str(self.path)) from e

    def close(self) -> None:
        if not self._f.closed:
            self.commit()
            self._f.close()

    def __enter__(self) -> JsonlStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def atomic_write(path: str | Path, data: str | bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the new one, never a mix.

    The file gets the destination's mode if it exists, else the usual `0o666 & ~umask` (a bare `mkstemp` would make
    every summary and pairs file private to its owner). An `OSError` names `path`, not the temp file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
    except OSError as e:
        _raise_naming(e, path)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), _mode(path, 0o666))
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            _raise_naming(e, path)
        raise


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write(path, json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=False) + "\n")


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temp dir beside `path`; on success it replaces `path` whole, on failure it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    try:
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp"))
    except OSError as e:
        _raise_naming(e, path)
    try:
        os.chmod(tmp, _mode(path, 0o777))  # mkdtemp makes it 0o700: a model dir others could not load
        yield tmp
        if path.exists():
            old = _old(path)
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)  # a kill between these two renames is undone by the next `atomic_dir(path)`
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _old(path: Path) -> Path:
    return path.with_name(f".{path.name}.old")


# `.<name>.<pid>.<random>.tmp`, or `.<name>.<random>.tmp` as temps were named before the pid was added (always
# treated as stale). mkstemp's random part has no dots.
_TEMP_RE = re.compile(r"^(?:(\d+)\.)?[a-z0-9_]+\.tmp$")


def remove_stale_temps(path: str | Path) -> list[Path]:
    """Remove the temps a killed `atomic_write`/`atomic_dir` left beside `path`; undo a half-done directory swap.

    A temp whose writer is still running (its pid is alive, e.g. another thread of this process) is left alone.
    Each removal is logged. Returns the paths removed or restored.
    """
    path = Path(path)
    prefix, done = f".{path.name}.", []
    old = _old(path)
    if old.is_dir():
        if not path.exists():  # killed between `replace(path, old)` and `replace(tmp, path)`: put the old copy back
            os.replace(old, path)
            log.warning("%s: restored from %s (a replace was interrupted)", path, old.name)
        else:
            shutil.rmtree(old, ignore_errors=True)
            log.warning("%s: removed the stale %s (a replace was interrupted)", path, old.name)
        done.append(old)
    try:
        siblings = [p for p in path.parent.iterdir() if p.name.startswith(prefix)]
    except OSError:
        return done
    for sibling in siblings:
        m = _TEMP_RE.match(sibling.name[len(prefix) :])
        if not m or (m.group(1) and _alive(int(m.group(1)))):
            continue
        if sibling.is_dir() and not sibling.is_symlink():
            shutil.rmtree(sibling, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                sibling.unlink()
        log.warning("%s: removed %s, left by an interrupted write", path, sibling.name)
        done.append(sibling)
    return done


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. EPERM: it exists, owned by someone else
        return True
    return True


def _mode(path: Path, default: int) -> int:
    try:
        return path.stat().st_mode & 0o7777
    except OSError:
        return default & ~_umask()


def _umask() -> int:
    try:  # Linux: read it without changing it (os.umask would, for an instant, for every thread)
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _raise_naming(e: OSError, path: Path) -> None:
    """Raise the same error (same errno, so the same subclass) naming the destination instead of a temp name."""
    if e.errno is None:
        raise e
    raise OSError(e.errno, e.strerror, str(path)) from e


def shard_of(record_id: str, num_shards: int) -> int:
    """Stable shard of an id: `sha256(id) % n`, so shards are disjoint and their union is every id."""
    digest = hashlib.sha256(record_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % num_shards


def parse_shard(spec: str | None) -> tuple[int, int] | None:
    """Parse `"i/n"` (0-based i) into `(i, n)`, or None."""
    if not spec:
        return None
    try:
        i_str, n_str = spec.split("/")
        i, n = int(i_str), int(n_str)
    except ValueError:
        raise ValueError(f"--shard {spec!r}: expected 'i/n' with whole numbers, e.g. --shard 0/4") from None
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"--shard {spec!r}: need 0 <= i < n, e.g. --shard 0/{max(n, 1)}")
    return i, n


def merge(inputs: list[str | Path], out: str | Path) -> dict[str, int]:
    """Union store files by id into `out` (first occurrence wins). Idempotent; `out` is written atomically.

    Rows whose id repeats with different content are counted as conflicts (the first is kept) and logged.
    """
    seen: dict[str, bytes] = {}
    lines: list[bytes] = []
    conflicts = duplicates = torn = 0
    for path in inputs:
        # Inputs are read, never repaired: a shard may still be being written by its worker.
        with open(path, "rb") as f:
            for line in f:
                if not line.strip():
                    continue
                if not line.endswith(b"\n") or not _parses(line):
                    torn += 1
                    log.warning("merge: skipping a torn line in %s (its shard can be resumed)", path)
                    continue
                rid = _line_id(line)
                if rid in seen:
                    if seen[rid] == line:
                        duplicates += 1
                    else:
                        conflicts += 1
                        log.warning("merge: id %r differs between inputs; keeping the first (%s)", rid, path)
                    continue
                seen[rid] = line
                lines.append(line)
    atomic_write(out, b"".join(lines))
    return {"records": len(lines), "duplicates": duplicates, "conflicts": conflicts, "torn": torn}
