"""A throw-away PostgreSQL cluster for the tests and the benchmarks.

Debian's server binaries (``initdb``, ``pg_ctl``, ``postgres``), run in a
temporary directory that is removed with the cluster. The server refuses to
run as root, so when we are root it runs as the unprivileged ``postgres``
user (``runuser``), which owns that directory.

It listens on a Unix socket in its directory and on 127.0.0.1 at a free
port, and only there. Two roles: ``dovecote`` (trust, the superuser the
tests use) and ``dovecote_pw`` (a password, over TCP only) for the tests of
credentials. ``fsync=off``: a test cluster dies with its data, and a server
crash (``pg_ctl restart -m immediate``, the chaos tests) loses nothing that
the kernel was given; only a machine crash would.

A cluster left behind by a killed test run (its directory names the pid of
the process that started it) is stopped and removed by the next start.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import itertools
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

PREFIX = "dovecote-pg-"
SUPERUSER = "dovecote"
PASSWORD_USER = "dovecote_pw"
PASSWORD = "s3cret-Pass.word"  # only for the test cluster's dovecote_pw role


class ClusterError(RuntimeError):
    """PostgreSQL is missing or would not start."""


def bin_dir() -> Path | None:
    """Where initdb/pg_ctl are: on PATH, else Debian's newest
    /usr/lib/postgresql/N/bin."""
    on_path = shutil.which("initdb")
    if on_path is not None:
        return Path(on_path).resolve().parent
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: (
            int(Path(p).parent.parent.name) if Path(p).parent.parent.name.isdigit() else 0
        ),
    )
    return Path(found[-1]).parent if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Cluster:
    """One PostgreSQL server in its own temporary directory."""

    def __init__(self) -> None:
        bindir = bin_dir()
        if bindir is None:
            raise ClusterError(
                "PostgreSQL is not installed (no initdb on PATH or in /usr/lib/postgresql/*/bin): "
                "make installs it when run as root (apt-get install postgresql)"
            )
        self.bin = bindir
        self.as_root = os.geteuid() == 0
        self.port = _free_port()
        self.dir = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-"))
        self.data = self.dir / "data"
        self.log = self.dir / "server.log"
        self.started = False
        self._names = itertools.count(1)

    # --- running the server's tools ----------------------------------------

    def _run(self, tool: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        command = [str(self.bin / tool), *args]
        if self.as_root:
            command = ["runuser", "-u", "postgres", "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=120)
        if check and done.returncode != 0:
            raise ClusterError(
                f"{tool} failed ({done.returncode}): {done.stderr.strip() or done.stdout.strip()}"
                + self._log_tail()
            )
        return done

    def _log_tail(self) -> str:
        try:
            return "\nserver log:\n" + "\n".join(self.log.read_text().splitlines()[-20:])
        except OSError:
            return ""

    # --- life --------------------------------------------------------------

    def start(self) -> None:
        """initdb, configure, start; on any failure nothing is left running."""
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        reap_stale()
        if self.as_root:
            shutil.chown(self.dir, "postgres", "postgres")
        os.chmod(self.dir, 0o755)  # the tests (root or the owner) reach the socket in it
        self._run(
            "initdb",
            "-D",
            str(self.data),
            "-U",
            SUPERUSER,
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
            "--no-instructions",
        )
        with open(self.data / "pg_hba.conf", "w") as hba:
            # The password role only over TCP with its password; everyone
            # else trusted, on the socket and the loopback address alone.
            hba.write(
                f"host all {PASSWORD_USER} 127.0.0.1/32 scram-sha-256\n"
                f"local all {PASSWORD_USER} reject\n"
                "local all all trust\n"
                "host all all 127.0.0.1/32 trust\n"
            )
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write(
                f"port = {self.port}\n"
                "listen_addresses = '127.0.0.1'\n"
                f"unix_socket_directories = '{self.dir}'\n"
                "fsync = off\n"
                "full_page_writes = off\n"
                "max_connections = 200\n"
                "shared_buffers = 32MB\n"
                "log_min_messages = warning\n"
                "log_statement = none\n"
            )
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "start")
        self.started = True
        self.psql(f"CREATE ROLE {PASSWORD_USER} LOGIN PASSWORD '{PASSWORD}'")
        self.psql(f"CREATE DATABASE {SUPERUSER} OWNER {SUPERUSER}")
        self.psql(f"GRANT ALL ON DATABASE {SUPERUSER} TO {PASSWORD_USER}")

    def restart(self, mode: str = "immediate") -> None:
        """``pg_ctl restart -m mode``: with ``immediate``, a crash and a
        recovery, every connection cut."""
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-m", mode, "restart")

    def stop(self) -> None:
        if self.started:
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop", check=False)
            self.started = False
        shutil.rmtree(self.dir, ignore_errors=True)

    # --- addresses ---------------------------------------------------------

    def url(self, database: str = SUPERUSER, *, tcp: bool = False) -> str:
        """A URL for ``database`` as the trusted superuser: on the Unix
        socket (the faster), or over TCP."""
        if tcp:
            return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"
        return f"postgresql://{SUPERUSER}@/{database}?host={self.dir}&port={self.port}"

    def password_url(self, database: str = SUPERUSER, password: str | None = PASSWORD) -> str:
        auth = PASSWORD_USER if password is None else f"{PASSWORD_USER}:{password}"
        return f"postgresql://{auth}@127.0.0.1:{self.port}/{database}"

    def psql(self, sql: str, database: str = "postgres") -> None:
        """Run ``sql`` as the superuser, outside a transaction (CREATE
        DATABASE cannot run in one)."""
        import psycopg

        with psycopg.connect(self.url(database), autocommit=True) as conn:
            conn.execute(sql.encode())

    def create_database(self, name: str | None = None, owner: str = SUPERUSER) -> str:
        """A new empty database (named ``test_N`` unless named); its URL
        (as the superuser)."""
        name = name or f"test_{next(self._names)}"
        self.psql(f'CREATE DATABASE "{name}" OWNER {owner}')
        return self.url(name)

    def drop_database(self, name: str) -> None:
        self.psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def reap_stale() -> None:
    """Stop and remove the clusters of test runs that died without doing so
    (a ``kill -9``): their directory names a pid that no longer runs."""
    for path in glob.glob(os.path.join(tempfile.gettempdir(), PREFIX + "*")):
        pid_text = Path(path).name[len(PREFIX) :].partition("-")[0]
        if not pid_text.isdigit() or _pid_alive(int(pid_text)):
            continue
        data = Path(path) / "data"
        pidfile = data / "postmaster.pid"
        with contextlib.suppress(OSError, ValueError):
            server = int(pidfile.read_text().split()[0])
            os.kill(server, 9)  # its children exit when the postmaster does
            for _ in range(100):
                if not _pid_alive(server):
                    break
                time.sleep(0.02)
        shutil.rmtree(path, ignore_errors=True)


_shared: Cluster | None = None


def shared_cluster() -> Cluster:
    """The test session's one cluster, started at its first use (the
    ``pg_cluster`` fixture, or a store kind of tests/stores.py), stopped by
    ``stop_shared_cluster`` or, failing that, when the process exits.
    PostgreSQL missing: the test is skipped, or fails under CI=true; a
    server that will not start fails it."""
    global _shared
    import pytest

    if _shared is None:
        if bin_dir() is None:
            message = (
                "PostgreSQL is not installed (as root, `make pytest` installs it: "
                "apt-get install postgresql)"
            )
            if os.environ.get("CI") == "true":
                pytest.fail(message + " (required under CI=true)")
            pytest.skip(message)
        cluster = Cluster()
        try:
            cluster.start()
        except ClusterError as exc:
            pytest.fail(f"could not start PostgreSQL: {exc}")
        atexit.register(cluster.stop)
        _shared = cluster
    return _shared


def stop_shared_cluster() -> None:
    global _shared
    if _shared is not None:
        _shared.stop()
        _shared = None
