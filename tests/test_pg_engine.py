"""The engine, the CLI and ``serve`` on a PostgreSQL database: everywhere a
path is taken, a ``postgresql://`` URL opens the server (a real one: the
session's throw-away cluster, tests/pgcluster.py)."""

from __future__ import annotations

import json
import os
import subprocess
from typing import Any

import psycopg
import pytest

import flows
from flows.location import open_store
from flows.pgstore import PostgresStore
from tests.conftest import DOVECOTE, ask
from tests.editor import served


def dovecote(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [DOVECOTE, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
        check=False,
    )


async def test_open_engine_takes_a_postgresql_url(pg_url: str) -> None:
    async with flows.open_engine(pg_url) as engine:
        assert isinstance(engine.store, PostgresStore)
        reply = await engine.call("scripted", ask("teh cat"))
        assert reply.text == "the cat"
        [command] = engine.list(["done"])
    # Committed in the server, seen by another connection.
    store = open_store(pg_url, "read")
    try:
        assert store.get(command.id).state == "done"
        assert [e.event for e in store.history(command.id)] == [
            "submit",
            "dispatch",
            "reply",
            "finish",
        ]
    finally:
        store.close()


async def test_dovecote_db_may_be_a_url(pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOVECOTE_DB", pg_url)
    async with flows.open_engine() as engine:
        assert isinstance(engine.store, PostgresStore)
        await engine.call("scripted", ask("teh"))


async def _one_done_and_one_dead(url: str) -> tuple[str, str]:
    async with flows.open_engine(url) as engine:
        done = await engine.submit("scripted", ask("teh"))
        dead = await engine.submit("scripted", ask("#fail 400\nx"))
        await engine.wait(done)
        await engine.wait(dead)
    return done, dead


async def test_every_cli_command_takes_the_url(pg_cluster: Any) -> None:
    """Look-only commands and the ones that change the database, by --db
    and by $DOVECOTE_DB, with a password in the URL that is never printed."""
    pg_cluster.create_database("cli_url")
    url = pg_cluster.password_url("cli_url")
    pg_cluster.psql("GRANT ALL ON SCHEMA public TO dovecote_pw", database="cli_url")
    done, dead = await _one_done_and_one_dead(url)
    outputs = []
    for args in (
        ["pending"],
        ["dead"],
        ["show", done],
        ["stats"],
        ["export"],
        ["cache", "stats"],
        ["flow", "list"],
    ):
        run = dovecote("--db", url, *args, "--json")
        assert run.returncode == 0, (args, run.stderr)
        outputs.append(run.stdout + run.stderr)
    assert json.loads(outputs[1])[0]["id"] == dead
    assert json.loads(outputs[2])["command"]["state"] == "done"
    env_run = dovecote("dead", "--json", env={"DOVECOTE_DB": url})
    assert env_run.returncode == 0, env_run.stderr
    assert json.loads(env_run.stdout)[0]["id"] == dead
    replay = dovecote("--db", url, "replay", dead, "--no-wait", "--json")
    assert replay.returncode == 0, replay.stderr
    prune = dovecote("--db", url, "prune", "--older-than", "1d", "--json")
    assert prune.returncode == 0, prune.stderr
    outputs += [env_run.stdout, replay.stdout + replay.stderr, prune.stdout + prune.stderr]
    assert not [o for o in outputs if "s3cret" in o]


def test_a_look_only_command_opens_it_read_only_and_creates_nothing(pg_url: str) -> None:
    run = dovecote("--db", pg_url, "pending")
    assert run.returncode == 1
    assert "holds no dovecote database" in run.stderr
    with psycopg.connect(pg_url) as conn:
        found = conn.execute("SELECT to_regclass('commands')").fetchone()
    assert found == (None,)


def test_a_wrong_password_is_one_line_without_the_password(pg_cluster: Any) -> None:
    url = pg_cluster.password_url(password="not-the-s3cret")
    for args in (["pending"], ["replay", "--all"]):
        run = dovecote("--db", url, *args)
        assert run.returncode == 1, run.stderr
        assert "refused the credentials" in run.stderr
        assert "not-the-s3cret" not in run.stderr + run.stdout
        assert "Traceback" not in run.stderr


async def test_serve_takes_the_url(pg_url: str) -> None:
    """``dovecote serve --db URL --stdio``: an editor's call is stored in
    the server and its state comes back as notifications."""
    async with served(pg_url) as (editor, _):  # type: ignore[arg-type]
        await editor.initialize()
        result = await editor.request(
            "command/submit", {"adapter": "scripted", "request": ask("teh")}
        )
        await editor.wait_state(result["commandId"], {"done"})
    store = open_store(pg_url, "read")
    try:
        assert store.get(result["commandId"]).state == "done"
    finally:
        store.close()
