"""The throw-away PostgreSQL cluster the tests run on: it answers, each test
gets a database of its own, and nothing but loopback can reach it."""

from __future__ import annotations

import os
import stat
from typing import Any

import psycopg


def test_each_test_has_a_database_of_its_own(pg_url: str, pg_cluster: Any) -> None:
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE mine (x int)")
        name = conn.execute("SELECT current_database()").fetchone()
    other = pg_cluster.create_database("another_one")
    with psycopg.connect(other) as conn:
        assert conn.execute("SELECT current_database()").fetchone() == ("another_one",)
        assert conn.execute("SELECT to_regclass('mine')").fetchone() == (None,)
    assert name is not None and name[0].startswith("test_")


def test_it_listens_on_loopback_only_and_trusts_only_its_owner(pg_cluster: Any) -> None:
    with psycopg.connect(pg_cluster.url()) as conn:
        row = conn.execute("SHOW listen_addresses").fetchone()
    assert row == ("127.0.0.1",)
    # The trusted socket, in a directory only its owner enters...
    assert stat.S_IMODE(os.stat(pg_cluster.dir).st_mode) == 0o700
    socket_file = pg_cluster.dir / f".s.PGSQL.{pg_cluster.port}"
    assert stat.S_IMODE(os.stat(socket_file).st_mode) == 0o700
    # ...and over TCP no trust: the superuser without a password is refused.
    try:
        psycopg.connect(f"postgresql://dovecote@127.0.0.1:{pg_cluster.port}/dovecote").close()
    except psycopg.OperationalError as exc:
        assert "rejects connection" in str(exc) or "pg_hba.conf" in str(exc)
    else:
        raise AssertionError("the superuser got in over TCP without a password")


def test_the_password_role_needs_its_password(pg_cluster: Any) -> None:
    with psycopg.connect(pg_cluster.password_url()) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("dovecote_pw",)
    try:
        psycopg.connect(pg_cluster.password_url(password="wrong")).close()
    except psycopg.OperationalError as exc:
        assert "password authentication failed" in str(exc)
    else:
        raise AssertionError("a wrong password was let in")
