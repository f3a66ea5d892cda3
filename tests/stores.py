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
from collections.abc import Callable
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


STORES: dict[str, Callable[[], StoreKind]] = {"sqlite": SqliteKind}
