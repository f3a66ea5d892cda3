"""Shared helpers for the test suite: real SQLite files in tmp_path, real
processes, trio's MockClock where time is the subject."""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings

from flows.storage import StoreProtocol
from tests.stores import STORES, StoreKind

settings.register_profile("thorough", max_examples=2000, deadline=None)
settings.register_profile("ci", deadline=None)
settings.register_profile("fuzz", max_examples=500, deadline=None)  # make fuzz: per batch
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# A test that forgets --db must not reach the person's own database: their
# DOVECOTE_DB is dropped, and the user data directory of the default rule
# (flows.engine.default_db_path) is a temporary one, for this process and every
# process it starts.
os.environ.pop("DOVECOTE_DB", None)
os.environ["XDG_DATA_HOME"] = tempfile.mkdtemp(prefix="dovecote-test-data-")
atexit.register(shutil.rmtree, os.environ["XDG_DATA_HOME"], True)

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
DOVECOTE = str(Path(sys.executable).with_name("dovecote"))


def ask(text: str, **extra: Any) -> dict[str, Any]:
    """A request whose one user message is ``text``."""
    return {"messages": [{"role": "user", "content": text}], **extra}


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "dovecote.db"


def require_tool(name: str) -> str:
    """The path of an external tool; under CI=true a missing tool fails the
    test instead of skipping it."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed"
        if os.environ.get("CI") == "true":
            pytest.fail(message + " (required under CI=true)")
        pytest.skip(message)
    return path


@contextmanager
def mounted_tmpfs(mount: Path, size: str = "2m") -> Iterator[Path]:
    """A small file system of our own at ``mount`` (a tmpfs), where a disk
    can really fill or be made read-only. Mounting needs root; under
    CI=true not being able to fails the test instead of skipping it."""
    mount.mkdir(parents=True, exist_ok=True)
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
        check=False,
    )
    if made.returncode != 0:
        message = f"cannot mount a tmpfs: {made.stderr.strip() or made.returncode}"
        if os.environ.get("CI") == "true":
            pytest.fail(message + " (required under CI=true)")
        pytest.skip(message)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


# --- PostgreSQL: one throw-away cluster per session (tests/pgcluster.py) -----


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[Any]:
    """The session's PostgreSQL server (started at first use, stopped at the
    end of the session, on a failure or ^C too). Missing, it skips the tests
    that need it, and fails them under CI=true; one that will not start
    fails them."""
    from tests.pgcluster import shared_cluster, stop_shared_cluster

    try:
        yield shared_cluster()
    finally:
        stop_shared_cluster()


@pytest.fixture
def pg_url(pg_cluster: Any) -> str:
    """The URL of a new, empty database on the session's cluster (about
    25 ms to make: a test never sees another's rows)."""
    return str(pg_cluster.create_database())


@pytest.fixture
def own_registries() -> Iterator[None]:
    """Handlers, checks and flows a test registers are dropped after it: a
    test that runs once per store registers its own (closures over its
    locals) again on the second run, under the same names."""
    from flows import checks, handlers, runtime

    registries: list[dict[str, Any]] = [handlers.REGISTRY, checks.REGISTRY, runtime.REGISTRY]
    saved = [dict(registry) for registry in registries]
    try:
        yield
    finally:
        for registry, before in zip(registries, saved, strict=True):
            registry.clear()
            registry.update(before)


@pytest.fixture(params=sorted(STORES))
def db(request: pytest.FixtureRequest, tmp_path: Path, own_registries: None) -> Path | str:
    """Where an engine's store lives, once for each store: a SQLite file in
    ``tmp_path``, then a fresh PostgreSQL database (``pg_url``). A test
    about the engine, a flow or the bridge takes ``db`` and runs on both;
    ``open_engine``, ``open_store`` and ``dovecote serve --db`` take either.

    Tests about the SQLite file itself (read with sqlite3, its permissions,
    WAL, kill -9 on a file) keep ``db_path``. So do the tests on trio's
    MockClock (``autojump_clock``): a PostgreSQL commit waits in a worker
    thread, and while it does the autojump sees every task asleep and moves
    time on, so the exact times those tests assert would not hold; time, not
    the store, is their subject.
    """
    if request.param == "sqlite":
        return tmp_path / "dovecote.db"
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture(params=sorted(STORES))
def store_kind(request: pytest.FixtureRequest) -> Iterator[StoreKind]:
    """Each store implementation in turn (tests/stores.py)."""
    kind = STORES[request.param]()
    try:
        yield kind
    finally:
        kind.close()


@pytest.fixture
def make_store(store_kind: StoreKind) -> Callable[[], StoreProtocol]:
    """Makes fresh, empty stores of the implementation under test."""
    return store_kind.new
