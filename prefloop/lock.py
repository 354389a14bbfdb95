"""One writer per output: an exclusive OS lock on `<out>.lock` for as long as a stage (or the loop) writes `out`.

    with output_lock("candidates.jsonl"):   # a second process on the same output refuses at once
        ...

- The lock is a POSIX record lock (`fcntl.lockf`) on a file beside the output. The kernel drops it when the
  process ends, however it ends, so a killed run never blocks the next one; a forked child (a vLLM or Ray worker)
  does not inherit it, so an orphaned worker cannot hold an output hostage either.
- A second process refuses at once with `OutputLocked`, naming the output and the pid (and command) that holds it.
- Within one process the lock is reentrant (counted): the loop runs its stages in-process, and a stage re-run in the
  same process after a failure must not lock itself out. Threads of one process are not told apart.
- The lock file holds the holder's pid and program, for the refusal message only; the lock itself is the kernel's.
  A run that ends removes it, while still holding the lock: a process that opened the old file meanwhile sees that
  the path no longer names what it locked, and starts over. A killed run leaves it behind, unlocked and harmless.
- Beside a directory output (a trained model, a loop run) the lock is `<dir>.lock`, not inside it: `--new-run`
  moves the directory aside, and the lock must stay with the path, not with the old contents.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from prefloop.errors import PrefloopError

T = TypeVar("T")
log = logging.getLogger(__name__)


class OutputLocked(PrefloopError, RuntimeError):
    """Another process is writing this output."""


_held: dict[str, tuple[int, int, list[Path]]] = {}  # lock path -> (fd, depth, folders it made) in this process


def lock_path(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.name.rstrip("/") + ".lock")


@contextlib.contextmanager
def output_lock(out: str | Path, wait: bool = False) -> Iterator[Path]:
    """Hold the exclusive lock on `out` for the block; raise `OutputLocked` if another process holds it, or with
    `wait` take turns: block until the holder is done (e.g. two processes converting one model)."""
    path = acquire(out, wait)
    try:
        yield path
    finally:
        release(path)


def acquire(out: str | Path, wait: bool = False) -> Path:
    path = lock_path(out)
    made = _make_parents(path.parent)  # removed again on release if still empty: a refused run leaves nothing
    key = str(path.resolve())
    if key in _held:
        fd, depth, made = _held[key]
        _held[key] = (fd, depth + 1, made)
        return Path(key)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _holder(fd)
            if wait:
                log.info("%s: waiting for another process (%s)", out, holder)
                fcntl.lockf(fd, fcntl.LOCK_EX)
                if _same_file(fd, path):
                    break
                os.close(fd)
                continue
            os.close(fd)
            _remove_empty(made)
            raise OutputLocked(
                f"{out} is being written by another process ({holder}). Fix: wait for it to finish, or stop it; two "
                f"processes never write one output (the lock is {path}, released when its holder exits)."
            ) from None
        if _same_file(fd, path):
            break
        os.close(fd)  # the holder removed the file between our open and our lock: lock the new one
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}: {_command()}\n".encode())
    _held[key] = (fd, 1, made)
    return Path(key)


def release(path: Path) -> None:
    key = str(path)
    fd, depth, made = _held[key]
    if depth > 1:
        _held[key] = (fd, depth - 1, made)
        return
    del _held[key]
    with contextlib.suppress(OSError):
        os.unlink(key)  # while still locked: a process that opened it meanwhile sees it gone and retries
    os.close(fd)  # closing the only descriptor drops the record lock
    _remove_empty(made)


def _make_parents(folder: Path) -> list[Path]:
    """Create `folder` and its missing parents; return the ones created, deepest first."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for d in reversed(missing):
        d.mkdir(exist_ok=True)
    return missing


def _remove_empty(folders: list[Path]) -> None:
    for d in folders:
        try:
            d.rmdir()
        except OSError:
            return  # not empty (the stage wrote there) or gone: keep it and its parents


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


def _holder(fd: int) -> str:
    try:
        text = os.pread(fd, 4096, 0).decode("utf-8", errors="replace").strip()
    except OSError:
        text = ""
    return text or "a process that has not said who it is yet"


def _command() -> str:
    """The program and its subcommand (not its flags: they may carry a URL with credentials)."""
    argv = [os.path.basename(sys.argv[0]), *sys.argv[1:2]] if sys.argv and sys.argv[0] else ["python"]
    return " ".join(" ".join(argv).split())[:120]  # one line, whatever the program was started with


def exclusive(run: Callable[..., T]) -> Callable[..., T]:
    """Decorate a stage's `run(config)`: the whole call holds the lock on `config.out`."""

    @functools.wraps(run)
    def locked(config: Any, *args: Any, **kwargs: Any) -> T:
        with output_lock(config.out):
            return run(config, *args, **kwargs)

    return locked
