"""Progress for long stages: rows done/failed and tokens/s, on a tqdm bar (stderr) or plain log lines."""

from __future__ import annotations

import os
import sys
import time

from tqdm import tqdm


class Progress:
    """A bar over rows with `done`, `failed` and `tok/s` in its postfix. `initial` counts rows resumed from disk."""

    def __init__(self, total: int, desc: str, initial: int = 0, unit: str = "prompt"):
        self.done = initial
        self.failed = 0
        self.tokens = 0
        self.started = time.time()
        # A bar only on a terminal; in CI/log files, tqdm's carriage returns make noise, so print every ~10%.
        disable = not sys.stderr.isatty() or os.environ.get("PREFLOOP_NO_BAR") == "1"
        self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=disable, dynamic_ncols=True)
        self._total, self._desc, self._next_log = total, desc, initial + max(1, total // 10)
        self._plain = disable

    def update(self, done: int = 0, failed: int = 0, tokens: int = 0) -> None:
        self.done += done
        self.failed += failed
        self.tokens += tokens
        self.bar.update(done + failed)
        rates = {"tok_s": f"{self.tokens_per_s:.0f}"} if self.tokens else {}
        self.bar.set_postfix(done=self.done, failed=self.failed, **rates, refresh=False)
        if self._plain and self.done + self.failed >= self._next_log:
            self._next_log += max(1, self._total // 10)
            rate = f" tok/s={self.tokens_per_s:.0f}" if self.tokens else ""
            print(
                f"{self._desc}: {self.done + self.failed}/{self._total} done={self.done} failed={self.failed}{rate}",
                file=sys.stderr,
                flush=True,
            )

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(time.time() - self.started, 1e-9)

    def close(self) -> None:
        self.bar.close()
