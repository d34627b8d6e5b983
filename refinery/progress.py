"""Progress of a long step, with an ETA, as log lines (they reach the Dagster UI through Pipes)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


class Progress:
    """``p = Progress("recovery steps", 40, log); p.update(done, "loss 0.12")`` logs at most every
    ``every`` seconds, and always at the first and the last item."""

    def __init__(self, what: str, total: int, log: Callable[[str], Any], every: float = 10.0) -> None:
        self.what, self.total, self.log, self.every = what, max(int(total), 1), log, every
        self.start = time.perf_counter()
        self._first: tuple[float, int] | None = None  # the rate is measured from the first item on
        self._last = -every

    def update(self, done: int, note: str = "") -> None:
        now = time.perf_counter()
        if self._first is None:
            self._first = (now, done)
        if done not in (1, self.total) and now - self._last < self.every:
            return
        self._last = now
        t0, d0 = self._first
        eta = f"ETA {(now - t0) / (done - d0) * (self.total - done):.0f} s" if done > d0 else "ETA after the next"
        self.log(f"{self.what}: {done}/{self.total} ({100 * done / self.total:.0f}%), {now - self.start:.0f} s "
                 f"elapsed, {eta}" + (f"; {note}" if note else ""))
