"""The files dovecote keeps: who may read them, and reading them where
nothing can be written.

The database holds every prompt and every reply: it and its WAL are its
owner's alone, whatever the umask. The commands that only look (``pending``,
``dead``, ``show``, ``stats``, ``export``, ``flow list``) work on a file
nobody may write: a read-only mount, or a file and directory of another
user. Tests that need another user become ``nobody`` inside a child process
that has already imported dovecote (the interpreter itself lives where
``nobody`` may not read)."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import DOVECOTE, PYTHON, ROOT, mounted_tmpfs

NOBODY = 65534

FILL = """
import os, sys, trio, flows
os.umask(0o022)
async def main():
    async with flows.open_engine(sys.argv[1]) as engine:
        await engine.call("scripted", {"messages": [{"role": "user", "content": "teh secret"}]})
        await engine.submit("scripted", {"messages": [{"role": "user", "content": "#hang\\nx"}]})
        if sys.argv[2] == "crash":
            os._exit(0)  # leaves the WAL and its shared memory behind, as kill -9 does
trio.run(main)
"""


def fill(db: Path, how: str = "close") -> None:
    subprocess.run([PYTHON, "-c", FILL, str(db), how], cwd=ROOT, check=True, timeout=60)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def look(db: Path, *, user: int | None = None) -> dict[str, str]:
    """The output of every look-only command on ``db``; run as ``user``."""
    if user is None:
        outputs = {}
        for command in LOOKS:
            done = subprocess.run(
                [DOVECOTE, *command, "--db", str(db)],
                capture_output=True,
                text=True,
                timeout=60,
                cwd=db.parent,
            )
            assert done.returncode == 0, (command, done.stderr)
            outputs[command[0]] = done.stdout
        return outputs
    done = subprocess.run(
        [PYTHON, "-c", AS_USER, str(db), str(user)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout))


LOOKS = (["pending"], ["dead"], ["stats"], ["export"], ["flow", "list"], ["cache", "stats"])

AS_USER = f"""
import contextlib, io, json, os, sys
import sqlite3, sqlite_utils
import flows.cli, flows.datasets, flows.flowcli  # imported before the user cannot read them
sqlite_utils.Database(sqlite3.connect(":memory:"))  # its plugins load lazily, from the venv
db, user = sys.argv[1], int(sys.argv[2])
os.setgroups([])
os.setgid(user)
os.setuid(user)
os.chdir("/")
outputs = {{}}
for command in {LOOKS!r}:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = flows.cli.main([*command, "--db", db])
    assert code == 0, (command, err.getvalue())
    outputs[command[0]] = out.getvalue()
json.dump(outputs, sys.stdout)
"""


def test_the_database_and_its_wal_are_their_owners_alone(tmp_path: Path) -> None:
    db = tmp_path / "new" / "deeper" / "dovecote.db"
    fill(db, "crash")
    for made in (db, db.with_name("dovecote.db-wal"), db.with_name("dovecote.db-shm")):
        assert mode(made) == 0o600, made
    assert mode(db.parent) == 0o700
    assert mode(db.parent.parent) == 0o700


def test_look_only_commands_read_a_read_only_mount(tmp_path: Path) -> None:
    with mounted_tmpfs(tmp_path / "ro", "8m") as mount:
        cleanly, crashed = mount / "clean" / "dovecote.db", mount / "crashed" / "dovecote.db"
        fill(cleanly)
        fill(crashed, "crash")
        assert not cleanly.with_name("dovecote.db-wal").exists()
        assert crashed.with_name("dovecote.db-wal").stat().st_size > 0
        subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
        for db in (cleanly, crashed):
            seen = look(db)
            exported = [json.loads(line) for line in seen["export"].splitlines()]
            assert [c["state"] for c in exported][:1] == ["done"], db
            assert exported[0]["reply"]["text"] == "the secret"
            assert exported[1]["state"] in ("pending", "sent")
            assert exported[1]["id"] in seen["pending"]
        # What writes says so, in one line.
        pruned = subprocess.run(
            [DOVECOTE, "prune", "--older-than", "0", "--db", str(cleanly)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert pruned.returncode == 1 and "Traceback" not in pruned.stderr
        assert len(pruned.stderr.strip().splitlines()) == 1


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory another user can reach (pytest's own are 0700)."""
    if os.geteuid() != 0:
        message = "becoming another user needs root"
        if os.environ.get("CI") == "true":
            pytest.fail(message + " (required under CI=true)")
        pytest.skip(message)
    path = Path(tempfile.mkdtemp(prefix="dovecote-shared-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        for inside in (path, *path.rglob("*")):
            if inside.is_dir():
                inside.chmod(0o755)
        shutil.rmtree(path)


def test_look_only_commands_work_for_a_user_who_cannot_write(shared_dir: Path) -> None:
    db = shared_dir / "theirs" / "dovecote.db"
    fill(db)
    db.chmod(0o444)
    db.parent.chmod(0o555)
    seen = look(db, user=NOBODY)
    exported = [json.loads(line) for line in seen["export"].splitlines()]
    assert [c["state"] for c in exported][:1] == ["done"]
    assert exported[1]["state"] in ("pending", "sent") and exported[1]["id"] in seen["pending"]
    assert "scripted" in seen["stats"] and "no flows" in seen["flow"]
    assert sorted(p.name for p in db.parent.iterdir()) == ["dovecote.db"]  # nothing written


CONFIG_AS_USER = """
import contextlib, io, os, sys
import flows.cli
os.setgroups([])
os.setgid(65534)
os.setuid(65534)
os.chdir(sys.argv[1])
err = io.StringIO()
with contextlib.redirect_stderr(err):
    code = flows.cli.main(["adapters"])
print(code)
print(err.getvalue(), end="")
"""


def test_an_unreadable_config_is_one_clear_line(shared_dir: Path) -> None:
    private = shared_dir / "private"
    private.mkdir(mode=0o700)
    (private / "dovecote.toml").write_text("")
    (shared_dir / "dovecote.toml").symlink_to(private / "dovecote.toml")
    done = subprocess.run(
        [PYTHON, "-c", CONFIG_AS_USER, str(shared_dir)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    code, *lines = done.stdout.splitlines()
    assert code == "1" and "Traceback" not in done.stderr, done.stderr
    assert lines == ["dovecote: dovecote.toml: cannot read: Permission denied"]
    # As root, a name too long says so the same way.
    named = shared_dir / ("x" * 300) / "dovecote.toml"
    done = subprocess.run(
        [DOVECOTE, "adapters", "--config", str(named)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.splitlines() == [f"dovecote: {named}: cannot read: File name too long"]
