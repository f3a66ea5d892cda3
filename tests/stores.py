"""Every store implementation the suites run against, behind one face.

``STORES`` maps a name to a ``StoreKind``: what a test needs to make fresh
stores of that implementation, open a second handle on one (as another
process would), and look under the protocol where only that implementation
can (its schema version, its raw contents). The ``make_store`` fixture
(tests/conftest.py) is parametrized over ``STORES``; adding a store to every
contract test is one entry here.
"""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import sqlite3
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from flows.operations import Operation
from flows.storage import StoreProtocol
from flows.store import SCHEMA_VERSION, Store


def commit_one(store: StoreProtocol, op: Operation) -> Any:
    """Commit ``op`` alone and return its result; raise what it raised."""
    [result] = store.commit([op])
    if isinstance(result, BaseException):
        raise result
    return result


class StoreKind(Protocol):
    """One store implementation, as the tests drive it."""

    own_clock: bool
    """Whether the store judges leases on its own clock (a database
    server's) rather than by the ``now`` it is given."""

    def new(self) -> StoreProtocol:
        """A new, empty store of its own (a file, a database), up to date."""
        ...

    def again(self, store: StoreProtocol) -> StoreProtocol:
        """A second, independent handle on ``store``'s data, as another
        process would open it."""
        ...

    def journal_rows(self, store: StoreProtocol) -> int:
        """How many journal rows the store holds in all."""
        ...

    def lapse(self, store: StoreProtocol, command_ids: Sequence[str]) -> None:
        """Let the leases of ``command_ids`` run out, for a store that judges
        lapses on its own clock (a database server's: the ``now`` a test
        passes to ``abandoned`` cannot move it); nothing for one that judges
        them by that ``now``."""
        ...

    def make_newer(self, store: StoreProtocol) -> None:
        """Mark ``store``'s data as written by a newer dovecote (a schema
        version past this one's); ``store`` is closed first."""
        ...

    def reopen(self, store: StoreProtocol) -> StoreProtocol:
        """Open ``store``'s data again, as a new process would (it may raise
        what opening raises)."""
        ...

    def fingerprint(self, store: StoreProtocol) -> str:
        """A digest of everything ``store``'s data holds: equal digests mean
        nothing changed."""
        ...

    def close(self) -> None:
        """Drop every store this kind made."""
        ...


class SqliteKind:
    """``flows.store.Store``: one SQLite file per store, in a temporary
    directory of this kind's own."""

    own_clock = False

    def __init__(self) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="dovecote-stores-"))
        self.made = 0
        self.opened: list[Store] = []

    def _path(self, store: StoreProtocol) -> Path:
        assert isinstance(store, Store)
        return store.path

    def _open(self, path: Path) -> Store:
        store = Store(path)
        self.opened.append(store)
        return store

    def new(self) -> StoreProtocol:
        self.made += 1
        return self._open(self.directory / f"store-{self.made}" / "dovecote.db")

    def again(self, store: StoreProtocol) -> StoreProtocol:
        return self._open(self._path(store))

    def reopen(self, store: StoreProtocol) -> StoreProtocol:
        return self._open(self._path(store))

    def lapse(self, store: StoreProtocol, command_ids: Sequence[str]) -> None:
        pass  # SQLite judges a lease by the caller's ``now``

    def journal_rows(self, store: StoreProtocol) -> int:
        assert isinstance(store, Store)
        return int(store.db.execute("SELECT count(*) FROM events").fetchone()[0])

    def make_newer(self, store: StoreProtocol) -> None:
        path = self._path(store)
        store.close()
        with contextlib.closing(sqlite3.connect(path)) as conn:
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")

    def fingerprint(self, store: StoreProtocol) -> str:
        path = self._path(store)
        digest = hashlib.sha256()
        with contextlib.closing(sqlite3.connect(path)) as conn:
            digest.update(str(conn.execute("PRAGMA user_version").fetchone()).encode())
            for line in conn.iterdump():
                digest.update(line.encode())
        return digest.hexdigest()

    def close(self) -> None:
        for store in self.opened:
            with contextlib.suppress(Exception):
                store.close()
        shutil.rmtree(self.directory, ignore_errors=True)


class PostgresKind:
    """``flows.pgstore.PostgresStore``: one database per store, on the
    session's throw-away cluster (tests/pgcluster.py), dropped at the end."""

    own_clock = True

    def __init__(self) -> None:
        from tests.pgcluster import shared_cluster

        self.cluster = shared_cluster()
        self.databases: list[str] = []
        self.opened: list[Any] = []
        self.connections: dict[str, Any] = {}

    def _open(self, url: str) -> StoreProtocol:
        from flows.pgstore import PostgresStore

        store = PostgresStore(url)
        self.opened.append(store)
        return store

    @staticmethod
    def _url(store: StoreProtocol) -> str:
        from flows.pgstore import PostgresStore

        assert isinstance(store, PostgresStore)
        return store.location.url

    def new(self) -> StoreProtocol:
        url = self.cluster.create_database()
        self.databases.append(url.partition("@/")[2].partition("?")[0])
        return self._open(url)

    def again(self, store: StoreProtocol) -> StoreProtocol:
        return self._open(self._url(store))

    def reopen(self, store: StoreProtocol) -> StoreProtocol:
        return self._open(self._url(store))

    def _conn(self, store: StoreProtocol) -> Any:
        """A connection of the test's own to ``store``'s database (kept: the
        invariants ask after every step, and connecting costs more)."""
        import psycopg

        url = self._url(store)
        if url not in self.connections:
            self.connections[url] = psycopg.connect(url, autocommit=True)
        return self.connections[url]

    def _query(self, store: StoreProtocol, sql: str) -> list[tuple[Any, ...]]:
        return list(self._conn(store).execute(sql.encode()).fetchall())

    def journal_rows(self, store: StoreProtocol) -> int:
        return int(self._query(store, "SELECT count(*) FROM events")[0][0])

    def lapse(self, store: StoreProtocol, command_ids: Sequence[str]) -> None:
        from flows.pgstore import LEASE_EXPIRES, NOW

        self._conn(store).execute(
            f"UPDATE commands SET {LEASE_EXPIRES} = {NOW} - 1 WHERE id = ANY(%s)".encode(),
            (list(command_ids),),
        )

    def make_newer(self, store: StoreProtocol) -> None:
        self._conn(store).execute("UPDATE schema_version SET version = %s", (SCHEMA_VERSION + 1,))
        store.close()

    def fingerprint(self, store: StoreProtocol) -> str:
        from flows import schema

        digest = hashlib.sha256()
        names = self._query(
            store,
            "SELECT table_name FROM information_schema.tables "
            "WHERE table_schema = 'public' ORDER BY table_name",
        )
        digest.update(repr(names).encode())
        if any(n == ("schema_version",) for n in names):
            digest.update(repr(self._query(store, "SELECT * FROM schema_version")).encode())
        for table in schema.TABLES:
            if (table.name,) in names:
                order = ", ".join(table.primary_key)
                rows = self._query(store, f"SELECT * FROM {table.name} ORDER BY {order}")
                digest.update(repr(rows).encode())
        return digest.hexdigest()

    def close(self) -> None:
        for closable in [*self.opened, *self.connections.values()]:
            with contextlib.suppress(Exception):
                closable.close()
        for name in self.databases:
            with contextlib.suppress(Exception):
                self.cluster.drop_database(name)


STORES: dict[str, Callable[[], StoreKind]] = {"sqlite": SqliteKind, "postgresql": PostgresKind}
