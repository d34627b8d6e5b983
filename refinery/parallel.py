"""A function over a stream in forked worker processes: results in input order, a bounded number
in flight.

The data stage's per-batch work is Python and C++ that holds the GIL (fastText's ``predict`` does:
two threads took as long as one, measured), so a second core needs a second process. The workers
are forked: they inherit what the parent loaded (the language-ID model, the eval n-gram index) by
copy-on-write instead of loading or building it again, and only the batches and their results
travel through pipes. At most ``workers * ahead`` items are in flight, so memory stays bounded by
the batch size however long the stream is.
"""

from __future__ import annotations

import gc
import multiprocessing as mp
import sys
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")
R = TypeVar("R")

_STATE: dict[int, Any] = {}  # what the workers inherit, by key (set before they are forked)


def _call(fn: Callable[[Any, T], R], key: int, item: T) -> R:
    return fn(_STATE[key], item)


def fork_safe() -> bool:
    """False when numba's GNU OpenMP layer has run a parallel kernel here: a fork would be killed."""
    numba = sys.modules.get("numba")
    if numba is None:
        return True
    try:
        return numba.threading_layer() != "omp"
    except ValueError:  # no parallel kernel has run yet: the layer is chosen at the first one
        return True


def ordered_map(fn: Callable[[Any, T], R], state: Any, items: Iterable[T], workers: int,
                ahead: int = 2) -> Iterator[R]:
    """``fn(state, item)`` for each item, in order. With ``workers`` > 1 the calls run in that many
    forked processes (``fn`` a module-level function, ``item`` and the result picklable; ``state``
    is inherited, never pickled); an exception in a worker is raised here. With 1, in this process."""
    if workers > 1 and not fork_safe():
        warnings.warn("refinery.parallel: numba's GNU OpenMP threading layer already ran in this process, and "
                      "a process forked after it is killed: mapping in this process instead (set "
                      "NUMBA_THREADING_LAYER=forksafe before numba is imported)", RuntimeWarning, stacklevel=2)
        workers = 1
    if workers <= 1:
        yield from (fn(state, item) for item in items)
        return
    key = id(state)
    _STATE[key] = state
    # the parent's objects leave the collector's reach while the workers live: a collection in a
    # worker would otherwise write to every object's header and copy the parent's heap page by page
    gc.freeze()
    try:
        with ProcessPoolExecutor(workers, mp_context=mp.get_context("fork")) as pool:
            pending: deque = deque()
            for item in items:
                pending.append(pool.submit(_call, fn, key, item))
                if len(pending) >= workers * ahead:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
    finally:
        gc.unfreeze()
        _STATE.pop(key, None)


class WriteBehind:
    """Calls run in order in one background thread while this one goes on, at most ``limit``
    waiting (memory stays bounded): for Parquet writes, whose encoding and compression release
    the GIL. An exception from a call is raised by the next ``submit`` or by ``close``."""

    def __init__(self, limit: int = 3):
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="write-behind")
        self._pending: deque[Future] = deque()
        self._limit = limit

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        while len(self._pending) >= self._limit:
            self._pending.popleft().result()
        self._pending.append(self._pool.submit(fn, *args))

    def close(self, writers: Iterable[Any] = ()) -> None:
        """Wait for every call (raising the first failure), stop the thread, then close ``writers``
        (the files the calls wrote to), whatever happened."""
        try:
            while self._pending:
                self._pending.popleft().result()
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)
            for w in writers:
                w.close()
