"""The PostgreSQL store's own promises, on the session's real PostgreSQL
(tests/pgcluster.py): one clear error for each way of not reaching a
database, a password that never shows, a schema created whole or not at
all, leases on the server's clock. What both stores promise is in the
store contract tests."""

from __future__ import annotations

import logging
import socket
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from flows import schema
from flows.errors import SchemaTooNew, StoreError
from flows.location import PgLocation, is_postgres_url, location, open_store
from flows.pgstore import PostgresStore
from flows.store import Store
from tests.pgcluster import PASSWORD


def tables(url: str) -> set[str]:
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
        ).fetchall()
    return {r[0] for r in rows}


def test_a_url_opens_postgresql_and_a_path_sqlite(pg_url: str, tmp_path: Any) -> None:
    store = open_store(pg_url)
    assert isinstance(store, PostgresStore)
    store.close()
    sqlite = open_store(tmp_path / "x.db")
    assert isinstance(sqlite, Store)
    sqlite.close()
    assert location("postgresql://u@h/db") == "postgresql://u@h/db"  # not folded as a Path
    assert str(location("a//b.db")) == "a/b.db"
    assert is_postgres_url("postgres://h/db") and not is_postgres_url("postgresql.db")


def test_the_schema_is_created_whole_with_its_version(pg_url: str) -> None:
    PostgresStore(pg_url).close()
    expected = {t.name for t in schema.TABLES} | {"schema_version", "dead_letters"}
    assert tables(pg_url) == expected
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [
            (schema.SCHEMA_VERSION,)
        ]
    PostgresStore(pg_url).close()  # a second opening finds it as it is


def test_a_database_from_a_newer_dovecote_is_refused_and_left_alone(pg_url: str) -> None:
    PostgresStore(pg_url).close()
    with psycopg.connect(pg_url) as conn:
        conn.execute("UPDATE schema_version SET version = %s", (schema.SCHEMA_VERSION + 1,))
    for read_only in (False, True):
        with pytest.raises(SchemaTooNew, match="newer dovecote"):
            PostgresStore(pg_url, read_only=read_only)
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [
            (schema.SCHEMA_VERSION + 1,)
        ]


def test_a_schema_that_cannot_be_finished_leaves_nothing(pg_url: str) -> None:
    """A table of the same name in the way: the creation fails, and none
    of the others it made before are left half created."""
    with psycopg.connect(pg_url) as conn:
        conn.execute("CREATE TABLE flows (something int)")
    with pytest.raises(StoreError, match="cannot set up"):
        PostgresStore(pg_url)
    assert tables(pg_url) == {"flows"}


def test_reading_an_empty_database_creates_nothing(pg_url: str) -> None:
    with pytest.raises(StoreError, match="no dovecote database"):
        open_store(pg_url, "read")
    assert tables(pg_url) == set()


def test_a_read_only_store_cannot_write(pg_url: str) -> None:
    PostgresStore(pg_url).close()
    store = open_store(pg_url, "read")
    assert store.list() == []
    with pytest.raises(StoreError, match="read-only"):
        store.prune(0)
    store.close()


@pytest.mark.parametrize(
    "url, says",
    [
        ("postgresql://[::1/db", "not a valid PostgreSQL URL"),
        ("postgresql://u@h/db?nonsense=1", "not a valid PostgreSQL URL"),
        ("postgresql://u@localhost:notaport/db", "is not a number"),
        ("postgresql://u@localhost:99999/db", "is not a number"),
    ],
)
def test_a_bad_url_says_so(url: str, says: str) -> None:
    with pytest.raises(StoreError, match=says):
        PostgresStore(url)


def test_a_refused_connection_says_so() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # free, and nothing listens on it once closed
    with pytest.raises(StoreError, match="connection refused") as caught:
        PostgresStore(f"postgresql://someone@127.0.0.1:{port}/db")
    assert f"127.0.0.1:{port}/db" in str(caught.value)


def test_a_missing_database_says_so(pg_cluster: Any) -> None:
    with pytest.raises(StoreError, match='database "no_such_db" does not exist'):
        PostgresStore(pg_cluster.url("no_such_db"))


# --- the password --------------------------------------------------------


def test_wrong_credentials_say_so_without_the_password(pg_cluster: Any) -> None:
    wrong = "Wr0ng-pa55-word"
    with pytest.raises(StoreError, match="refused the credentials") as caught:
        PostgresStore(pg_cluster.password_url(password=wrong))
    assert wrong not in str(caught.value) and wrong not in repr(caught.value)
    assert caught.value.__cause__ is None and caught.value.__context__ is None


def test_a_missing_password_says_so(pg_cluster: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PGPASSWORD", raising=False)
    monkeypatch.setenv("PGPASSFILE", "/nonexistent")
    with pytest.raises(StoreError, match="refused the credentials"):
        PostgresStore(pg_cluster.password_url(password=None))


@pytest.fixture
def own_db(pg_cluster: Any) -> str:
    """A database of the password role's own: its name."""
    name = f"pw_{next(_names)}"
    pg_cluster.create_database(name, owner="dovecote_pw")
    return name


_names = iter(range(1, 1_000_000))


def test_the_password_may_come_from_pgpassword_or_pgpass(
    pg_cluster: Any, own_db: str, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = pg_cluster.password_url(own_db, password=None)
    monkeypatch.setenv("PGPASSWORD", PASSWORD)
    PostgresStore(url).close()
    monkeypatch.delenv("PGPASSWORD")
    pgpass = tmp_path / "pgpass"
    pgpass.write_text(f"127.0.0.1:{pg_cluster.port}:*:dovecote_pw:{PASSWORD}\n")
    pgpass.chmod(0o600)
    monkeypatch.setenv("PGPASSFILE", str(pgpass))
    PostgresStore(url).close()


def test_the_password_is_in_no_repr_error_log_or_table(
    pg_cluster: Any, own_db: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    url = pg_cluster.password_url(own_db)
    store = PostgresStore(url)
    try:
        seen = [repr(store), str(store.path), repr(store.location), str(store.location)]
        from flows.store import Note

        (error,) = store.commit([Note("no-such-command", "note", 1.0)])
        seen.append(str(error))
        assert "no-such-command" in str(error)
        with psycopg.connect(pg_cluster.url(own_db)) as conn:
            for table in (t.name for t in schema.TABLES):
                seen.extend(str(r) for r in conn.execute(f"SELECT * FROM {table}").fetchall())
            seen.extend(
                str(r)
                for r in conn.execute(
                    "SELECT application_name, query FROM pg_stat_activity"
                ).fetchall()
            )
    finally:
        store.close()
    for bad in (
        url.replace(PASSWORD, "x:y@z"),  # a URL libpq cannot parse, quoted in its error
        url.replace(f":{pg_cluster.port}/", ":notaport/"),
        url.replace("dovecote_pw:", "nobody:"),
    ):
        with pytest.raises(StoreError) as caught:
            PostgresStore(bad)
        seen.append(str(caught.value))
        assert caught.value.__context__ is None  # no driver error that quotes the URL
    seen.extend(r.getMessage() for r in caplog.records)
    for text in seen:
        assert PASSWORD not in text, text


def test_a_url_password_with_an_unencoded_at_sign_is_refused_unquoted() -> None:
    with pytest.raises(StoreError, match="percent-encode") as caught:
        PgLocation.parse("postgresql://me:p@ss@db.example/x")
    assert "p@ss" not in str(caught.value)


# --- several engines on one database ---------------------------------------


def _pending(adapter: str = "a") -> Any:
    from adapters.base import Request
    from flows.records import Command, new_id

    return Command(
        id=new_id(),
        adapter=adapter,
        state="pending",
        created_at=time.time(),
        timeout=30.0,
        request=Request.from_json({"messages": [{"role": "user", "content": "hi"}]}),
    )


def _claim(command: Any, owner: str, at: float, lease: float) -> Any:
    from flows.operations import Move
    from flows.states import DISPATCH, SENT

    after = command.evolve(state=SENT, sent_at=at, owner=owner, lease_until=at + lease)
    return Move(command, after, DISPATCH, at)


def test_a_lease_lives_by_the_servers_clock_not_the_engines(pg_url: str) -> None:
    """An engine whose clock runs an hour ahead does not find a live lease
    run out; one whose clock is an hour behind still finds a lapsed one."""
    from flows.operations import Insert

    one, other = PostgresStore(pg_url), PostgresStore(pg_url)
    try:
        live, short = _pending(), _pending()
        one.commit([Insert(live), Insert(short)])
        now = time.time()
        one.commit([_claim(live, "h1:1:a", now, 30.0), _claim(short, "h1:1:a", now, 0.3)])
        # Written as the engine gave it: it reads back exactly.
        assert one.get(live.id).lease_until == now + 30.0
        ahead = [c.id for c in other.abandoned("h2:2:b", now + 3600, lambda _: False)]
        assert live.id not in ahead
        time.sleep(0.5)  # the server's clock moves on: the short lease runs out
        behind = [c.id for c in other.abandoned("h2:2:b", now - 3600, lambda _: False)]
        assert behind == [short.id]
    finally:
        one.close()
        other.close()


def test_a_claim_of_a_row_another_engine_is_claiming_loses_at_once(pg_url: str) -> None:
    """SKIP LOCKED: while another transaction holds the row, the claim is a
    lost race at once, not a wait for the other's commit."""
    from flows.operations import Insert
    from flows.states import LostRace

    store = PostgresStore(pg_url)
    command = _pending()
    store.commit([Insert(command)])
    holder = psycopg.connect(pg_url)
    try:
        holder.execute("SELECT * FROM commands WHERE id = %s FOR UPDATE", (command.id,))
        results: list[Any] = []
        claiming = threading.Thread(
            target=lambda: results.extend(
                store.commit([_claim(command, "h2:2:b", time.time(), 30.0)])
            ),
            daemon=True,
        )
        claiming.start()
        claiming.join(timeout=10)
        assert not claiming.is_alive(), "the claim waited for the other transaction"
        [lost] = results
        assert isinstance(lost, LostRace) and "being claimed by another engine" in str(lost)
        holder.rollback()
        # Once the other let go, the claim wins.
        [won] = store.commit([_claim(command, "h2:2:b", time.time(), 30.0)])
        assert not isinstance(won, BaseException)
        assert store.get(command.id).owner == "h2:2:b"
    finally:
        holder.close()
        store.close()


def test_a_reader_paging_the_journal_misses_nothing_that_writers_commit(pg_url: str) -> None:
    """Three writers commit batches at once while a reader pages the journal
    by id (``events_since``, as the bridge's notifications do): it sees every
    row exactly once, in order; no id ever shows up behind one already read."""
    from flows.operations import Insert

    writers = [PostgresStore(pg_url) for _ in range(3)]
    reader = PostgresStore(pg_url)
    errors: list[Any] = []

    def write(store: PostgresStore) -> None:
        for _ in range(30):
            results = store.commit([Insert(_pending()) for _ in range(5)])
            errors.extend(r for r in results if isinstance(r, BaseException))

    threads = [threading.Thread(target=write, args=(w,)) for w in writers]
    for t in threads:
        t.start()
    seen: list[int] = []
    try:
        while any(t.is_alive() for t in threads) or len(seen) < 450:
            # Whether they are done before the read: a batch committed
            # between an empty read and this check is read next time.
            done = not any(t.is_alive() for t in threads)
            batch = reader.events_since(seen[-1] if seen else 0)
            seen.extend(e.seq for e in batch)
            if not batch and done:
                break
    finally:
        for t in threads:
            t.join()
        for store in (*writers, reader):
            store.close()
    assert errors == []
    assert len(seen) == 450 and seen == sorted(set(seen))


def test_a_store_carries_on_after_the_server_restarts(pg_cluster: Any, pg_url: str) -> None:
    """``pg_ctl restart -m immediate`` (a crash and a recovery) cuts every
    connection: what was committed is there, a read connects again by
    itself, the batch in the cut is told it failed and the next one
    commits, and the listener says "look" once, then listens again."""
    from flows.operations import Insert
    from flows.wakeups import EVERY_ADAPTER

    store, other = PostgresStore(pg_url), PostgresStore(pg_url)
    try:
        kept = _pending()
        store.commit_one(Insert(kept))
        store.listen()
        pg_cluster.restart("immediate")
        assert store.get(kept.id) == kept  # committed before the crash; read reconnects
        assert store.wait_for_change(5).ready == {EVERY_ADAPTER}
        results = store.commit([Insert(_pending())])
        if isinstance(results[0], BaseException):  # the cut batch, told
            assert "the batch failed" in str(results[0])
            results = store.commit([Insert(_pending())])
        assert not isinstance(results[0], BaseException)
        other.commit([Insert(_pending("after"))])  # its writer reconnects too
        other.commit([Insert(_pending("after"))])
        told: set[str] = set()
        for _ in range(3):  # its own commit's notice ("a") may come first
            told |= store.wait_for_change(10).ready
            if "after" in told:
                break
        assert "after" in told
    finally:
        store.close()
        other.close()


def test_sqlite_refuses_a_url_rather_than_make_directories_of_it(tmp_path: Any) -> None:
    import os

    here = os.getcwd()
    os.chdir(tmp_path)
    try:
        for url in ("postgresql://me@host/db", Path("postgresql://me@host/db")):
            with pytest.raises(StoreError, match="not a SQLite file"):
                Store(url)
        assert list(tmp_path.iterdir()) == []
    finally:
        os.chdir(here)


def test_an_operation_the_server_refuses_fails_alone(pg_url: str) -> None:
    """A plain submit runs without a savepoint of its own (one round trip,
    not three); when the server refuses one (a duplicate id aborts the whole
    transaction), the batch runs again with a savepoint each: the others
    commit, journaled once, and only that one is told."""
    from flows.operations import Insert

    store = PostgresStore(pg_url)
    try:
        a, b = _pending(), _pending()
        store.commit_one(Insert(a))
        first, refused, second = store.commit([Insert(b), Insert(a), Insert(_pending())])
        assert not isinstance(first, BaseException) and not isinstance(second, BaseException)
        assert isinstance(refused, StoreError) and "UniqueViolation" in str(refused)
        assert first.seq < second.seq
        assert [e.event for e in store.history(b.id)] == ["submit"]
        assert [e.event for e in store.history(a.id)] == ["submit"]  # not journaled again
        assert len(store.list()) == 3
    finally:
        store.close()
