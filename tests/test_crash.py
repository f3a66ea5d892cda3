"""Crash safety with real processes: kill -9 an engine with calls in flight
and check that a new one on the same file loses nothing; run two engines on
one file and check that nothing is sent twice."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import flows
from tests.conftest import PYTHON, ROOT


def start_worker(db: Path, log: Path, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "DOVECOTE_SCRIPTED_LOG": str(log)}
    return subprocess.Popen(
        [PYTHON, "-m", "tests.worker", "--db", str(db), *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )


def read_line(process: subprocess.Popen[str], prefix: str, timeout: float = 60) -> str:
    assert process.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if line.startswith(prefix):
            return line
        if not line and process.poll() is not None:
            raise AssertionError(f"worker exited with {process.returncode} before {prefix!r}")
    raise AssertionError(f"no {prefix!r} from the worker within {timeout} s")


def sends(log: Path) -> Counter[tuple[str, int]]:
    return Counter(tuple(line.split()) for line in log.read_text().splitlines())  # type: ignore[misc]


def test_kill_9_with_100_in_flight_loses_nothing(tmp_path: Path) -> None:
    db, log = tmp_path / "dovecote.db", tmp_path / "calls.log"
    first = start_worker(db, log, "--submit", "100", "--wait-sent", "--text", "#delay 2\nteh end")
    read_line(first, "sent 100")
    os.kill(first.pid, signal.SIGKILL)
    first.wait()

    store = flows.Store(db)
    assert [c.state for c in store.list()] == ["sent"] * 100
    store.close()

    started = time.monotonic()
    second = start_worker(db, log, "--until-done", "100")
    read_line(second, "finished 100")
    elapsed = time.monotonic() - started
    second.wait(timeout=30)

    store = flows.Store(db)
    commands = store.list()
    assert len(commands) == 100
    for command in commands:
        assert command.state == "done", command
        assert command.reply is not None and command.reply.text == "the end"
        assert command.attempt == 2
        journal = [(e.from_state, e.to_state, e.event) for e in store.history(command.id)]
        assert journal == [
            (None, "pending", "submit"),
            ("pending", "sent", "dispatch"),
            ("sent", "pending", "retry"),
            ("pending", "sent", "dispatch"),
            ("sent", "replied", "reply"),
            ("replied", "done", "finish"),
        ]
        retry = store.history(command.id)[2]
        assert retry.detail["reason"] == "interrupted"
        assert retry.at - commands[0].created_at < 30  # not after the 30 s lease
    store.close()
    # Each call was sent once by the killed engine and once by the new one.
    assert sends(log) == Counter({(c.id, str(a)): 1 for c in commands for a in (1, 2)})
    # Recovery is immediate (the dead pid is noticed), not after the lease:
    # the whole second run, start-up and the 2 s replies included, is short.
    assert elapsed < 2 + 5


def test_two_engines_on_one_file_send_each_command_once(tmp_path: Path) -> None:
    db, log = tmp_path / "dovecote.db", tmp_path / "calls.log"
    a = start_worker(db, log, "--submit", "0", "--until-done", "1000", "--max-in-flight", "40")
    b = start_worker(db, log, "--until-done", "1000", "--max-in-flight", "40")
    read_line(a, "started")
    read_line(b, "started")
    submitter = start_worker(
        db,
        log,
        "--submit",
        "1000",
        "--text",
        "#delay 0.05\nteh",
        "--max-in-flight",
        "40",
        "--until-done",
        "1000",
    )
    for process in (a, b, submitter):
        read_line(process, "finished 1000", timeout=120)
        process.wait(timeout=30)
    store = flows.Store(db)
    commands = store.list()
    assert len(commands) == 1000 and {c.state for c in commands} == {"done"}
    owners: Counter[str] = Counter()
    for command in commands:
        dispatches = [e for e in store.history(command.id) if e.event == "dispatch"]
        assert len(dispatches) == 1
        owners[dispatches[0].detail["owner"]] += 1
    store.close()
    counted = sends(log)
    assert len(counted) == 1000 and set(counted.values()) == {1}
    assert {attempt for _, attempt in counted} == {"1"}
    # More than one engine did a share of the work.
    assert len(owners) >= 2, owners
