"""The commands that read or tidy a database work unchanged on PostgreSQL:
the same rows, copied from a SQLite file into a PostgreSQL database, read
the same through ``pending``, ``dead``, ``show``, ``stats``, ``export``,
``cache stats``, ``flow list`` and ``prune``, byte for byte. Real
``dovecote`` processes, a real server (tests/pgcluster.py)."""

from __future__ import annotations

import sqlite3
from contextlib import closing
from pathlib import Path

import psycopg

from flows import schema
from flows.location import open_store
from tests.test_cli import DONE, FAIL, Workspace, clean_env, dovecote, insert_waiting


def copy_into(sqlite_path: Path, url: str) -> None:
    """Every row of every described table, from the file to the database."""
    open_store(url).close()  # the schema, made by the store
    with closing(sqlite3.connect(sqlite_path)) as source, psycopg.connect(url) as target:
        for table in schema.TABLES:
            names = [c.name for c in table.columns]
            quoted = ", ".join(f'"{n}"' for n in names)
            rows = source.execute(f"SELECT {quoted} FROM {table.name}").fetchall()
            marks = ", ".join("%s" for _ in names)
            with target.cursor() as cursor:
                cursor.executemany(
                    f"INSERT INTO {table.name} ({quoted}) VALUES ({marks})".encode(), rows
                )


def test_every_looking_command_reads_postgresql_as_it_reads_sqlite(
    tmp_path: Path, pg_url: str
) -> None:
    ws = Workspace(tmp_path)
    done_id, dead_id = ws.calls(DONE, FAIL)
    ws.calls((DONE[0], {"cache": True}), (DONE[0], {"cache": True}))
    insert_waiting(ws.db, "queued", adapter="elsewhere")
    insert_waiting(ws.db, "on its way", state="sent", adapter="elsewhere")
    copy_into(ws.db, pg_url)

    def both(*args: str) -> str:
        here = ws.ok(*args)
        there = dovecote(tmp_path, *args, "--db", pg_url, env=clean_env(tmp_path))
        assert there.returncode == 0, there.stderr
        assert there.stdout == here, args
        return here

    # JSON for everything; the tables too where they show no age ("1.4s
    # ago" differs between two runs).
    both("stats")
    for looking in (("stats",), ("cache", "stats"), ("flow", "list"), ("pending",), ("dead",)):
        both(*looking, "--json")
    both("show", dead_id, "--json")
    both("show", done_id, "--json")
    assert done_id in both("export")
    assert dead_id in both("export", "--state", "dead")
    assert both("prune", "--older-than", "0s", "--json").strip() != '{"deleted": 0}'
    both("stats", "--json")  # the same commands left after the prune


def test_a_mistyped_database_url_is_one_line_of_error(tmp_path: Path, pg_cluster: object) -> None:
    result = dovecote(
        tmp_path,
        "stats",
        "--db",
        "postgresql://nobody:Top-Secret-1@127.0.0.1:1/none",
        env=clean_env(tmp_path),
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and "Top-Secret-1" not in result.stderr
    assert result.stderr.startswith("dovecote: cannot reach PostgreSQL at ")
