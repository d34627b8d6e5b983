"""The Pipes channel between Dagster and a stage: the partial-line bug reproduced, the fix, and a
broken stage failing with its name instead of a KeyError (resources/pipes.py has the root cause)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import dagster as dg
import pytest
from dagster._core.pipes.utils import PipesFileMessageReader

from resources.pipes import CompleteLineFileMessageReader, PipesChannelBroken, complete_lines

MESSAGE = {"__dagster_pipes_version": "0.1", "method": "log", "params": {"message": "x" * 300, "level": "INFO"}}

# Four threads write messages of 50 to 9,000 characters through dagster_pipes' own file writer.
WRITER = r'''
import random, sys, threading
from dagster_pipes import PipesFileMessageWriterChannel
channel = PipesFileMessageWriterChannel(sys.argv[1])
def work(t):
    rnd = random.Random(t)
    for i in range(int(sys.argv[2])):
        channel.write_message({"__dagster_pipes_version": "0.1", "method": "log",
                               "params": {"message": "x" * rnd.randint(50, 9000), "level": "INFO", "i": i}})
threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
[t.start() for t in threads]; [t.join() for t in threads]
'''


class Handler:
    """What a reader thread hands its messages to (the subset of PipesMessageHandler it uses)."""

    def __init__(self) -> None:
        self.messages: list[dict] = []
        self.errors: list[str] = []

    def handle_message(self, message: dict) -> None:
        self.messages.append(message)

    def report_pipes_framework_exception(self, origin: str, exc_info) -> None:
        self.errors.append(f"{origin}: {exc_info[1]}")


def _read_while(reader_cls, path: Path, write) -> Handler:
    """Run ``reader_cls``'s reader thread on ``path`` while ``write()`` appends to it."""
    handler, done = Handler(), threading.Event()
    path.write_text("")
    reader = reader_cls(str(path))
    thread = threading.Thread(target=lambda: _quiet(reader._reader_thread, handler, done))
    thread.start()
    write()
    time.sleep(0.3)
    done.set()
    thread.join(timeout=30)
    return handler


def _quiet(fn, *args) -> None:
    try:
        fn(*args)
    except Exception:  # the handler has recorded it
        pass


def _half_then_rest(path: Path) -> None:
    """One message arriving in two writes, as a reader sees a write the kernel has half copied."""
    line = (json.dumps(MESSAGE) + "\n").encode()
    with open(path, "ab", buffering=0) as f:
        f.write(line[:150])
        time.sleep(0.2)
        f.write(line[150:])


def test_dagster_reader_breaks_on_a_line_read_before_its_end(tmp_path):
    """The root cause, deterministic: Dagster's reader parses the first half of a line. If this
    starts failing, Dagster fixed its reader and resources.pipes can go."""
    handler = _read_while(PipesFileMessageReader, tmp_path / "m.jsonl", lambda: _half_then_rest(tmp_path / "m.jsonl"))
    assert len(handler.errors) == 1 and handler.messages == []  # the message is lost, the thread dead


def test_complete_line_reader_waits_for_the_newline(tmp_path):
    handler = _read_while(CompleteLineFileMessageReader, tmp_path / "m.jsonl",
                          lambda: _half_then_rest(tmp_path / "m.jsonl"))
    assert handler.errors == [] and handler.messages == [MESSAGE]


def test_every_message_of_concurrent_writers_arrives(tmp_path):
    """Thousands of messages from several threads of a real writer process: none lost or broken."""
    path = tmp_path / "m.jsonl"
    per_thread = 2000
    handler = _read_while(CompleteLineFileMessageReader, path, lambda: subprocess.run(
        [sys.executable, "-c", WRITER, str(path), str(per_thread)], check=True))
    assert handler.errors == []
    assert len(handler.messages) == 4 * per_thread


def test_a_message_cut_off_at_the_end_is_a_broken_channel(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps(MESSAGE) + "\n" + json.dumps(MESSAGE)[:40])
    lines = complete_lines(str(path), lambda: True)
    assert json.loads(next(lines)) == MESSAGE
    with pytest.raises(PipesChannelBroken, match="incomplete message"):
        next(lines)


def test_a_stage_that_publishes_nothing_fails_naming_itself(refinery_home, monkeypatch):
    """A stage process that dies (here: an interpreter that exits 1) is a StageFailed naming the
    stage and its planned version, never a KeyError."""
    import assets.common
    from assets.models import stage_asset
    from refinery import stages
    from resources import RefineryResource
    from resources.pipes import subprocess_client

    monkeypatch.setattr(assets.common, "stage_python", lambda st: "false")
    asset = stage_asset(stages.stage("base_model"))
    result = dg.materialize([asset], raise_on_error=False, resources={
        "refinery": RefineryResource(profile="smoke", home=str(refinery_home)), "pipes": subprocess_client(),
        "duckdb": dg.ResourceDefinition.none_resource()})
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    message = str(failure.event_specific_data.error.to_string())
    assert "StageFailed: stage base_model did not publish its artifact" in message
    assert "KeyError" not in message
