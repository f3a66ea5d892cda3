"""The ``dovecote`` command as a user runs it: the installed console script in
a real subprocess, each test in its own directory, on a database that a
short Python snippet (the engine, in this process) filled beforehand."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
from collections.abc import Awaitable, Callable
from contextlib import closing
from pathlib import Path
from typing import Any, TypeVar

import attrs
import pytest
import trio

import flows
from adapters.base import Reply, Request
from flows.engine import default_db_path
from flows.records import Command, Flow, new_id
from flows.store import Insert, InsertFlow, Move, Store, TakeOver, TakeOverFlow
from tests.conftest import DOVECOTE, ask

T = TypeVar("T")
Call = tuple[str, dict[str, Any]]  # (text, options of engine.submit)


def clean_env(home: Path, **extra: str) -> dict[str, str]:
    """The user's environment without any dovecote setting, and a home of
    its own so that no user config file is read."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DOVECOTE_", "XDG_DATA"))}
    env.update(HOME=str(home), XDG_CONFIG_HOME=str(home / ".config"))
    env.update(extra)
    return env


def dovecote(
    cwd: Path, *args: str | Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [DOVECOTE, *map(str, args)],
        cwd=cwd,
        env=env if env is not None else clean_env(cwd),
        capture_output=True,
        text=True,
        timeout=120,
    )


class Workspace:
    """A directory to run in and a database file (given with ``--db``)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.db = root / "work.db"

    def run(self, *args: str | Path, **env: str) -> subprocess.CompletedProcess[str]:
        return dovecote(self.root, *args, "--db", self.db, env=clean_env(self.root, **env))

    def ok(self, *args: str | Path, **env: str) -> str:
        result = self.run(*args, **env)
        assert result.returncode == 0, result.stderr
        assert "Traceback" not in result.stderr
        return result.stdout

    def json(self, *args: str | Path, **env: str) -> Any:
        return json.loads(self.ok(*args, "--json", **env))

    def engine(self, body: Callable[[flows.Engine], Awaitable[T]]) -> T:
        """Run ``body`` with an engine on the database, in this process."""

        async def main() -> T:
            async with flows.open_engine(self.db) as engine:
                return await body(engine)

        return trio.run(main)

    def calls(self, *calls: Call) -> list[str]:
        """Submit each (text, options) and wait for all to finish."""

        async def body(engine: flows.Engine) -> list[str]:
            ids = [await engine.submit("scripted", ask(text), **opts) for text, opts in calls]
            for command_id in ids:
                await engine.wait(command_id)
            return ids

        return self.engine(body)

    def export(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.ok("export").splitlines()]

    def rows(self) -> dict[str, list[tuple[Any, ...]]]:
        """Every row of the tables a command touches, read directly: to
        check that a command changed nothing."""
        with closing(sqlite3.connect(self.db)) as conn:
            return {
                table: conn.execute(f"SELECT * FROM {table} ORDER BY rowid").fetchall()
                for table in ("commands", "events", "late_replies")
            }


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    return Workspace(tmp_path)


def insert_waiting(db: Path, text: str, state: str = "pending", adapter: str = "elsewhere") -> str:
    """A command no engine here serves (its adapter is configured
    elsewhere), so it stays as it is while CLI engines come and go."""
    store = Store(db)
    try:
        command = Command(
            id=new_id(),
            adapter=adapter,
            request=Request.from_json(ask(text)),
            state="pending",
            created_at=1_700_000_000.0,
            timeout=30.0,
        )
        store.commit_one(Insert(command))
        if state == "sent":
            sent = attrs.evolve(
                command, state="sent", sent_at=1_700_000_001.0, deadline=1_700_000_031.0
            )
            store.commit_one(Move(command, sent, "dispatch", 1_700_000_001.0))
        return command.id
    finally:
        store.close()


FAIL: Call = ("#fail 400\nThis one is malformed.", {})
TIMEOUT: Call = ("#delay 0.5\nteh slow one", {"timeout": 0.1})
EXHAUSTED: Call = ("#fail 503\nTry later.", {"max_attempts": 1})
DONE: Call = ("Teh quick one", {})


def dead_ids(letters: list[dict[str, Any]]) -> dict[str, Any]:
    return {d["id"]: d for d in letters}


def dead_with_a_late_reply(ws: Workspace, text: str, late: str) -> str:
    """A call to ``text`` that timed out, and then got ``late`` as its reply; its id."""

    async def body(engine: flows.Engine) -> str:
        command_id = await engine.submit("scripted", ask(f"#hang\n{text}"), timeout=0.05)
        await engine.wait(command_id)
        await engine.deliver(command_id, {"text": late})
        return command_id

    return ws.engine(body)


# --- demo ---------------------------------------------------------------------


def test_demo_runs_the_whole_story_on_the_default_database(tmp_path: Path) -> None:
    env = clean_env(tmp_path)
    (tmp_path / ".dovecote").mkdir()  # as `make demo` does: the project's own database
    result = dovecote(tmp_path, "demo", env=env)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert (tmp_path / ".dovecote" / "dovecote.db").is_file()  # ./.dovecote/dovecote.db
    assert not (tmp_path / ".local").exists()

    # The states line, ending with everything finished.
    first_batch = out.split("\n2. ")[0]
    state_lines = [ln.strip() for ln in first_batch.splitlines() if ln.startswith("  pending ")]
    assert state_lines[-1] == "pending 0  sent 0  replied 0  done 8  dead 4  cancelled 0"
    assert "The quick brown fox jumps over the lazy dog." in out
    # The dead-letters table.
    assert "2. 4 dead letters: nothing was dropped" in out
    table = out.split("2. 4 dead letters")[1].split("\n3. ")[0]
    assert [ln.split()[3] for ln in table.splitlines()[3:] if ln.strip()] == [
        "timeout",
        "timeout",
        "error",
        "retries_exhausted",
    ]
    # The late reply, kept and not applied.
    assert "accepted=False late=True: kept as a late reply, not applied." in out
    # The replay table: one sent again, one resolved from the late reply.
    replays = out.split("\n4. ")[1].split("\nSummary")[0]
    assert "dead letter" in replays and "replayed as" in replays
    assert "sent, 1 attempt(s)" in replays and "This calendar is noticeable." in replays
    assert "late reply" in replays and "Which friend said that?" in replays
    assert "Summary: 12 calls, 2 replays, 10 done, 2 still dead (error, retries_exhausted)" in out

    # Afterwards, on the same default database:
    waiting = json.loads(dovecote(tmp_path, "dead", "--json", env=env).stdout)
    assert sorted(d["reason"] for d in waiting) == ["error", "retries_exhausted"]
    assert all(d["replayed_by"] is None for d in waiting)
    everything = json.loads(dovecote(tmp_path, "dead", "--all", "--json", env=env).stdout)
    assert len(everything) == 4
    replayed = [d for d in everything if d["replayed_by"] is not None]
    assert sorted(d["reason"] for d in replayed) == ["timeout", "timeout"]
    for letter in replayed:
        shown = json.loads(
            dovecote(tmp_path, "show", letter["replayed_by"], "--json", env=env).stdout
        )
        assert shown["command"]["replay_of"] == letter["id"]
        assert shown["command"]["state"] == "done"
    human = dovecote(tmp_path, "dead", env=env).stdout
    assert "2 dead letter(s)." in human and "retries_exhausted" in human


# --- where the database is --------------------------------------------------------


def test_database_path_default_env_and_flag(tmp_path: Path) -> None:
    default = tmp_path / ".dovecote" / "dovecote.db"
    from_env = tmp_path / "env" / "env.db"
    from_flag = tmp_path / "flag.db"
    for path, text in ((default, "in default"), (from_env, "in env"), (from_flag, "in flag")):
        insert_waiting(path, text)

    def prompts(*args: str, **env: str) -> list[str]:
        result = dovecote(tmp_path, "pending", "--json", *args, env=clean_env(tmp_path, **env))
        assert result.returncode == 0, result.stderr
        return [c["request"]["messages"][0]["content"] for c in json.loads(result.stdout)]

    assert prompts() == ["in default"]
    assert prompts(DOVECOTE_DB=str(from_env)) == ["in env"]
    assert prompts("--db", "flag.db", DOVECOTE_DB=str(from_env)) == ["in flag"]  # relative to cwd
    assert prompts("--db", str(from_flag)) == ["in flag"]
    assert prompts(DOVECOTE_DB="") == ["in default"]  # empty means unset


def test_default_database_is_the_nearest_project_one_else_the_user_data_dir(
    tmp_path: Path,
) -> None:
    """DESIGN.md's rule, as git finds .git: a shell anywhere inside a project sees the
    calls an editor made there; outside any project, the user's data directory."""
    project = tmp_path / "project"
    deep = project / "src" / "notes"
    deep.mkdir(parents=True)
    (project / ".dovecote").mkdir()
    insert_waiting(project / ".dovecote" / "dovecote.db", "in project")
    data = tmp_path / "data"
    insert_waiting(data / "dovecote" / "dovecote.db", "in data home")
    outside = tmp_path / "elsewhere"
    outside.mkdir()

    def prompts(cwd: Path, **env: str) -> list[str]:
        result = dovecote(cwd, "pending", "--json", env=clean_env(tmp_path, **env))
        assert result.returncode == 0, result.stderr
        return [c["request"]["messages"][0]["content"] for c in json.loads(result.stdout)]

    assert prompts(deep, XDG_DATA_HOME=str(data)) == ["in project"]
    assert prompts(project, XDG_DATA_HOME=str(data)) == ["in project"]
    assert prompts(outside, XDG_DATA_HOME=str(data)) == ["in data home"]
    # No XDG_DATA_HOME (or a relative one, which the spec says to ignore): ~/.local/share.
    home_db = tmp_path / ".local" / "share" / "dovecote" / "dovecote.db"
    insert_waiting(home_db, "in home")
    assert prompts(outside) == ["in home"]
    assert prompts(outside, XDG_DATA_HOME="relative/data") == ["in home"]


def test_default_db_path_rule_in_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DOVECOTE_DB", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    (tmp_path / "p" / ".dovecote").mkdir(parents=True)
    (tmp_path / "p" / "a" / "b").mkdir(parents=True)
    assert (
        default_db_path(tmp_path / "p" / "a" / "b") == tmp_path / "p" / ".dovecote" / "dovecote.db"
    )
    assert default_db_path(tmp_path) == tmp_path / "data" / "dovecote" / "dovecote.db"
    monkeypatch.setenv("DOVECOTE_DB", "x.db")
    assert default_db_path(tmp_path) == Path("x.db")


def test_env_database_is_used_and_no_default_one_is_made(tmp_path: Path) -> None:
    db = tmp_path / "elsewhere.db"
    command_id = insert_waiting(db, "hello")
    env = clean_env(tmp_path, DOVECOTE_DB=str(db))
    shown = json.loads(dovecote(tmp_path, "show", command_id, "--json", env=env).stdout)
    assert shown["command"]["id"] == command_id
    assert not (tmp_path / ".dovecote").exists()


@pytest.mark.parametrize("option", ["--db", "--json"])
def test_options_before_the_command_are_honoured(ws: Workspace, option: str) -> None:
    command_id = insert_waiting(ws.db, "hello")
    result = dovecote(ws.root, "--db", ws.db, "--json", "pending")
    assert result.returncode == 0, result.stderr
    if option == "--json":
        assert isinstance(json.loads(result.stdout), list)
    else:
        assert command_id in result.stdout
        assert not (ws.root / ".dovecote").exists()


# --- looking: pending, show, stats, export ---------------------------------------------


def test_pending_lists_what_is_not_finished(ws: Workspace) -> None:
    # A command that only looks never creates a database: a typo is an error.
    missing = ws.run("pending")
    assert missing.returncode == 1 and "no database at" in missing.stderr
    assert not ws.db.exists()
    [done_id, dead_id] = ws.calls(DONE, FAIL)
    pending_id = insert_waiting(ws.db, "#delay 1\nWaiting in line")
    sent_id = insert_waiting(ws.db, "On its way", state="sent")

    listed = ws.json("pending")
    assert [c["id"] for c in listed] == [pending_id, sent_id]
    assert [c["state"] for c in listed] == ["pending", "sent"]
    human = ws.ok("pending")
    assert pending_id in human and sent_id in human
    assert done_id not in human and dead_id not in human
    assert "Waiting in line" in human and "#delay" not in human  # the prompt, no directive
    assert [c["id"] for c in ws.json("pending", "--limit", "1")] == [pending_id]


def test_show_a_command_and_its_journal(ws: Workspace) -> None:
    [command_id] = ws.calls(("teh cat", {"max_attempts": 2}))
    shown = ws.json("show", command_id)
    command = shown["command"]
    assert (command["id"], command["state"], command["max_attempts"]) == (command_id, "done", 2)
    assert command["reply"]["text"] == "the cat"
    assert command["request"] == ask("teh cat")
    assert [(e["from_state"], e["to_state"], e["event"]) for e in shown["events"]] == [
        (None, "pending", "submit"),
        ("pending", "sent", "dispatch"),
        ("sent", "replied", "reply"),
        ("replied", "done", "finish"),
    ]
    assert all(e["command_id"] == command_id for e in shown["events"])
    assert shown["late_replies"] == []

    human = ws.ok("show", command_id)
    assert f"command   {command_id}" in human
    assert "state     done" in human and "attempt   1 of 2" in human
    assert "reply     the cat" in human
    journal = human.split("journal\n")[1].splitlines()
    assert [line.split()[2:5] for line in journal[2:]] == [
        ["-", "pending", "submit"],
        ["pending", "sent", "dispatch"],
        ["sent", "replied", "reply"],
        ["replied", "done", "finish"],
    ]


def test_show_a_dead_letter_with_its_late_reply(ws: Workspace) -> None:
    command_id = dead_with_a_late_reply(ws, "x", "too late, sorry")
    shown = ws.json("show", command_id)
    assert (shown["command"]["state"], shown["command"]["reason"]) == ("dead", "timeout")
    assert shown["command"]["reply"] is None  # the late reply is not applied
    assert [r["reply"]["text"] for r in shown["late_replies"]] == ["too late, sorry"]
    assert shown["late_replies"][0]["used_by"] is None
    human = ws.ok("show", command_id)
    assert "state     dead (timeout)" in human
    assert "late reply #1: too late, sorry" in human


def test_stats_counts_by_adapter_and_state(ws: Workspace) -> None:
    ws.calls(DONE, ("recieve", {}), FAIL)
    insert_waiting(ws.db, "queued", adapter="elsewhere")
    stats = ws.json("stats")
    assert stats["states"] == [
        {"adapter": "elsewhere", "state": "pending", "count": 1},
        {"adapter": "scripted", "state": "dead", "count": 1},
        {"adapter": "scripted", "state": "done", "count": 2},
    ]
    by_adapter = {row["key"]: row for row in stats["usage"]["adapter"]}
    assert by_adapter["scripted"] == {
        "key": "scripted",
        "calls": 3,
        "done": 2,
        "dead": 1,
        "input_tokens": 4,  # "Teh quick one" and "recieve": words of the prompts replied to
        "output_tokens": 4,
        "cost": 0.0,
    }
    human = ws.ok("stats").splitlines()
    assert human[0].split() == [
        "adapter",
        "pending",
        "sent",
        "replied",
        "done",
        "dead",
        "cancelled",
        "total",
    ]
    assert human[3].split() == ["scripted", "0", "0", "0", "2", "1", "0", "3"]


def test_export_one_json_object_per_line_with_events(ws: Workspace) -> None:
    [done_id, dead_id] = ws.calls(DONE, FAIL)
    pending_id = insert_waiting(ws.db, "queued")
    lines = ws.ok("export").splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["id"] for r in records] == [done_id, dead_id, pending_id]
    events = {r["id"]: [e["event"] for e in r["events"]] for r in records}
    assert events == {
        done_id: ["submit", "dispatch", "reply", "finish"],
        dead_id: ["submit", "dispatch", "fail"],
        pending_id: ["submit"],
    }
    assert records[1]["error"]["status"] == 400
    dead_only = ws.ok("export", "--state", "dead", "--state", "cancelled").splitlines()
    assert [json.loads(line)["id"] for line in dead_only] == [dead_id]


def test_prune_removes_finished_commands_only(ws: Workspace) -> None:
    async def body(engine: flows.Engine) -> list[str]:
        done = await engine.submit("scripted", ask("teh"))
        dead = await engine.submit("scripted", ask("#hang\nx"), timeout=0.05)
        cancelled = await engine.submit("scripted", ask("#hang\ny"), timeout=60)
        await engine.wait(done)
        await engine.wait(dead)
        await engine.deliver(dead, {"text": "late"})
        await engine.cancel(cancelled)
        return [done, dead, cancelled]

    finished = ws.engine(body)
    pending_id = insert_waiting(ws.db, "still waiting")
    sent_id = insert_waiting(ws.db, "in flight", state="sent")

    assert "deleted 0 finished command(s)" in ws.ok("prune", "--older-than", "1d")
    assert len(ws.rows()["commands"]) == 5
    assert ws.json("prune", "--older-than", "0s") == {"deleted": 3}
    left = ws.export()
    assert [r["id"] for r in left] == [pending_id, sent_id]
    assert [len(r["events"]) for r in left] == [1, 2]
    with closing(sqlite3.connect(ws.db)) as conn:
        marks = ",".join("?" * len(finished))
        for table in ("events", "late_replies"):
            sql = f"SELECT count(*) FROM {table} WHERE command_id IN ({marks})"
            assert conn.execute(sql, finished).fetchone() == (0,)
    assert ws.json("prune", "--older-than", "0s") == {"deleted": 0}


# --- acting: replay -------------------------------------------------------------------


def test_replay_ids_with_a_new_timeout(ws: Workspace) -> None:
    [slow_id, bad_id] = ws.calls(TIMEOUT, FAIL)
    [replay] = ws.json("replay", slow_id, "--timeout", "5")
    new = replay["to"]
    assert replay["from"] == slow_id
    assert (new["state"], new["replay_of"], new["timeout"]) == ("done", slow_id, 5.0)
    assert new["reply"]["text"] == "the slow one"
    assert list(dead_ids(ws.json("dead"))) == [bad_id]
    everything = dead_ids(ws.json("dead", "--all"))
    assert everything[slow_id]["replayed_by"] == new["id"]
    assert everything[bad_id]["replayed_by"] is None
    # The dead letter itself never changes.
    assert everything[slow_id]["state"] == "dead" and everything[slow_id]["reason"] == "timeout"


def test_replay_by_reason_prints_a_table(ws: Workspace) -> None:
    [slow1, bad, slow2] = ws.calls(TIMEOUT, FAIL, TIMEOUT)
    out = ws.ok("replay", "--reason", "timeout", "--timeout", "5")
    rows = [line.split() for line in out.splitlines()[2:] if line.strip()]
    assert [(r[0], r[2]) for r in rows] == [(slow1, "done"), (slow2, "done")]
    assert out.splitlines()[0].split() == ["dead", "letter", "replayed", "as", "state", "reason"]
    assert list(dead_ids(ws.json("dead"))) == [bad]


def test_replay_all_replays_every_waiting_dead_letter(ws: Workspace) -> None:
    [slow, bad, exhausted, done] = ws.calls(TIMEOUT, FAIL, EXHAUSTED, DONE)
    replays = ws.json("replay", "--all", "--timeout", "5")
    assert [r["from"] for r in replays] == [slow, bad, exhausted]
    outcome = {r["from"]: (r["to"]["state"], r["to"]["reason"]) for r in replays}
    assert outcome == {
        slow: ("done", None),
        bad: ("dead", "error"),  # still malformed
        exhausted: ("dead", "retries_exhausted"),
    }
    # The replays that died are the dead letters waiting now.
    waiting = ws.json("dead")
    assert {d["replay_of"] for d in waiting} == {bad, exhausted}
    assert done not in {d["id"] for d in ws.json("dead", "--all")}


def test_replay_with_the_late_reply_calls_no_model(ws: Workspace) -> None:
    dead_id = dead_with_a_late_reply(ws, "Wich freind?", "Which friend, typed by a person")
    log = ws.root / "calls.log"
    [replay] = ws.json("replay", dead_id, "--use-late-reply", DOVECOTE_SCRIPTED_LOG=str(log))
    new = replay["to"]
    assert (new["state"], new["replay_of"]) == ("done", dead_id)
    assert new["reply"]["text"] == "Which friend, typed by a person"
    assert new["sent_at"] is None
    assert not log.exists() or new["id"] not in log.read_text()
    late = ws.json("show", dead_id)["late_replies"]
    assert [r["used_by"] for r in late] == [new["id"]]
    assert [e["event"] for e in ws.json("show", new["id"])["events"]] == [
        "submit",
        "resolve",
        "finish",
    ]
    # Without the flag the model is called again (the late reply is used up anyway).
    [again] = ws.json("replay", dead_id, "--timeout", "0.1", DOVECOTE_SCRIPTED_LOG=str(log))
    assert again["to"]["reason"] == "timeout" and again["to"]["sent_at"] is not None
    assert log.read_text().split() == [again["to"]["id"], "1"]


@pytest.mark.parametrize(
    ("calls", "selection"),
    [
        ([DONE, DONE], ["--all"]),
        ([DONE, FAIL], ["--reason", "timeout"]),  # a dead letter, but not for this reason
    ],
)
def test_replay_with_nothing_to_replay(
    ws: Workspace, calls: list[Call], selection: list[str]
) -> None:
    ws.calls(*calls)
    before = ws.rows()
    result = ws.run("replay", *selection)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "no dead letters to replay"
    assert ws.rows() == before


# --- errors ---------------------------------------------------------------------


def test_show_an_unknown_id(ws: Workspace) -> None:
    ws.calls(DONE)
    before = ws.rows()
    result = ws.run("show", "no-such-id")
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.strip() == "dovecote: no command with id 'no-such-id'"
    assert ws.rows() == before


@pytest.mark.parametrize("which", ["unknown", "not dead"])
def test_replay_an_id_that_cannot_be_replayed(ws: Workspace, which: str) -> None:
    [done_id, dead_id] = ws.calls(DONE, FAIL)
    bad = "no-such-id" if which == "unknown" else done_id
    before = ws.rows()
    result = ws.run("replay", dead_id, bad)
    assert ws.rows() == before  # all ids are checked before anything is stored
    assert result.returncode == 1
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("dovecote: ") and bad in result.stderr


def test_replay_an_unknown_id_changes_nothing(ws: Workspace) -> None:
    [dead_id] = ws.calls(FAIL)
    before = ws.rows()
    result = ws.run("replay", dead_id, "no-such-id")
    assert result.returncode == 1
    assert "no command with id 'no-such-id'" in result.stderr
    assert ws.rows() == before


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["replay", "SOME-ID", "--all"], "give either IDs or a filter (--reason / --all)"),
        (["replay", "SOME-ID", "--reason", "timeout"], "give either IDs or a filter"),
        (["replay"], "say what to replay: IDs, --reason R or --all"),
        (["replay", "--all", "--timeout", "-5"], "expected a positive number of seconds"),
        (["prune", "--older-than", "soon"], "expected a duration like 90s"),
        (["prune"], "--older-than"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_usage_errors_exit_2_and_change_nothing(
    ws: Workspace, args: list[str], message: str
) -> None:
    ws.calls(FAIL)
    before = ws.rows()
    result = ws.run(*args)
    assert result.returncode == 2
    assert result.stdout == ""
    assert message in result.stderr and "usage: dovecote" in result.stderr
    assert ws.rows() == before


@pytest.mark.parametrize(
    "args", [["pending"], ["dead"], ["stats"], ["replay", "--all"], ["show", "x"], ["demo"]]
)
def test_a_database_from_a_newer_dovecote(ws: Workspace, args: list[str]) -> None:
    insert_waiting(ws.db, "hello")
    with closing(sqlite3.connect(ws.db)) as conn:
        conn.execute("PRAGMA user_version = 99")
    result = ws.run(*args)
    assert result.returncode == 1
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("dovecote: ")
    assert "newer dovecote (schema 99)" in result.stderr and "upgrade dovecote" in result.stderr
    with closing(sqlite3.connect(ws.db)) as conn:
        assert conn.execute("PRAGMA user_version").fetchone() == (99,)
        assert conn.execute("SELECT count(*) FROM commands").fetchone() == (1,)


@pytest.mark.parametrize("args", [["pending"], ["stats"], ["replay", "--all"], ["demo"]])
def test_a_file_that_is_not_a_database(ws: Workspace, args: list[str]) -> None:
    text = "these are my notes, not a database\n" * 40
    ws.db.write_text(text)
    result = ws.run(*args)
    assert result.returncode == 1
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    assert result.stderr.strip() == f"dovecote: {ws.db} is not a usable dovecote database: " + (
        "file is not a database"
    )
    assert ws.db.read_text() == text


def test_a_take_over_reads_as_a_note_in_show_and_flow_show(ws: Workspace) -> None:
    """A take-over is journaled (who held it, who holds it now) without a
    move: ``show`` and ``flow show`` list it with the state unchanged, and a
    declared flow's stage path is not mistaken for it."""
    store = Store(ws.db)
    try:
        at = 1_700_000_000.0
        command = Command(
            id=new_id(),
            adapter="elsewhere",
            request=Request.from_json(ask("held")),
            state="pending",
            created_at=at,
            timeout=30.0,
        )
        sent = attrs.evolve(command, state="sent", owner="h:1:old", lease_until=at + 1)
        replied = attrs.evolve(sent, state="replied", reply=Reply("r"), replied_at=at + 1)
        flow = Flow(
            new_id(),
            "a.flow",
            "running",
            at,
            at,
            stage="draft",
            owner="h:1:old",
            lease_until=at + 1,
        )
        for op in (
            Insert(command),
            Move(command, sent, "dispatch", at),
            Move(sent, replied, "reply", at + 1),
            TakeOver(replied, "h:2:new", at + 60, at + 30),
            InsertFlow(flow),
            TakeOverFlow(flow, "h:2:new", at + 60, at + 30),
        ):
            store.commit_one(op)
    finally:
        store.close()
    shown = ws.json("show", command.id)
    assert [(e["from_state"], e["to_state"], e["event"]) for e in shown["events"]][-1] == (
        "replied",
        "replied",
        "take over",
    )
    assert shown["events"][-1]["detail"] == {"previous_owner": "h:1:old", "owner": "h:2:new"}
    journal = ws.ok("show", command.id).split("journal\n")[1].splitlines()
    assert journal[-1].split()[2:6] == ["replied", "replied", "take", "over"]
    assert '"owner": "h:2:new"' in journal[-1]
    flow_shown = ws.json("flow", "show", flow.id)
    assert [(e["from_state"], e["to_state"], e["event"]) for e in flow_shown["events"]] == [
        (None, "running", "start"),
        ("running", "running", "take over"),
    ]
    assert flow_shown["flow"]["owner"] == "h:2:new"
    human = ws.ok("flow", "show", flow.id)
    [path] = [line for line in human.splitlines() if line.startswith("path")]
    assert "h:2:new" not in path and "h:1:old" not in path  # stages only
