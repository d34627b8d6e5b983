"""The Pipes channel between Dagster and the stage subprocesses, made to survive partial reads.

Root cause of the intermittent ``JSONDecodeError`` in a stage's Pipes reader thread (issue 8):
the subprocess appends each message as one JSON line to a file, and Dagster's reader tails it with
``readline()`` (``dagster._utils.tail_file``), which returns whatever is there at end of file, a
line whose newline has not arrived yet included. A write is not atomic for a concurrent reader:
the kernel copies it into the page cache a page at a time and the file grows as it goes, so the
reader sometimes gets the first part of a message, fails to parse it, and its thread dies; every
later message (the stage's final materialization among them) is lost.
tests/test_pipes_channel.py reproduces it with the real writer (several threads, thousands of
messages) and with a line written in two parts.

The fix is on the reading side, where the bug is: a line is handled only once its newline has
arrived, and a line still incomplete when the process is done is reported as a broken channel.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import dagster as dg
from dagster._core.pipes.utils import PipesFileMessageReader

POLL_SECONDS = 0.01


class PipesChannelBroken(RuntimeError):
    """The stage's message file ended in an incomplete message."""


def complete_lines(path: str, should_stop: Callable[[], bool]) -> Iterator[str]:
    """Lines another process appends to ``path``, each yielded only once its newline is there.

    After ``should_stop()`` turns true, the file is read to its end once more (what the writer
    wrote just before it exited); a remaining partial line raises PipesChannelBroken.
    """
    pending = b""
    with open(path, "rb") as f:
        while True:
            stopping = should_stop()
            chunk = f.read()
            if chunk:
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    if line.strip():
                        yield line.decode("utf-8")
            elif stopping:
                break
            else:
                time.sleep(POLL_SECONDS)
    if pending.strip():
        raise PipesChannelBroken(f"the message file ended in an incomplete message ({len(pending)} bytes: "
                                 f"{pending[:120]!r}...)")


class CompleteLineFileMessageReader(PipesFileMessageReader):
    """Dagster's file message reader with the partial-line bug fixed (see the module docstring)."""

    def _reader_thread(self, handler: Any, is_resource_complete: Any) -> None:
        try:
            for line in complete_lines(self._path, is_resource_complete.is_set):
                handler.handle_message(json.loads(line))
        except Exception:
            handler.report_pipes_framework_exception(f"{self.__class__.__name__} reader thread", sys.exc_info())
            raise


class CompleteLineTempFileMessageReader(dg.PipesTempFileMessageReader):
    """PipesTempFileMessageReader on CompleteLineFileMessageReader."""

    @contextmanager
    def read_messages(self, handler: Any) -> Iterator[Any]:
        with tempfile.TemporaryDirectory() as tempdir:
            reader = CompleteLineFileMessageReader(os.path.join(tempdir, "messages"),
                                                   include_stdio_in_messages=self._include_stdio_in_messages)
            with reader.read_messages(handler) as params:
                yield params


def subprocess_client() -> dg.PipesSubprocessClient:
    """The Pipes client every out-of-process stage runs through on one machine."""
    return dg.PipesSubprocessClient(message_reader=CompleteLineTempFileMessageReader())
