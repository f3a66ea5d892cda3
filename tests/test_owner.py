"""Who owns a lease, and when a new engine may take its work at once: only
when the owner's process is gone from this pid space (this boot of this
kernel, this pid namespace). A host name alone is not trusted: two machines,
or two containers, may share one, and a pid there names another process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from flows.store import make_owner, owner_is_gone


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def _space() -> str:
    return make_owner("x").rpartition("@")[2]


def test_a_dead_process_of_this_pid_space_is_gone_at_once() -> None:
    owner = make_owner("engine")
    host, _, rest = owner.partition(":")
    _, _, named = rest.partition(":")
    assert owner_is_gone(f"{host}:{_dead_pid()}:{named}")


def test_a_live_process_is_not_gone() -> None:
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        host = socket.gethostname()
        assert not owner_is_gone(f"{host}:{sleeper.pid}:engine@{_space()}")
        assert not owner_is_gone(make_owner("me"))  # this very process
    finally:
        sleeper.kill()
        sleeper.wait()


def test_the_same_host_name_on_another_machine_is_not_trusted() -> None:
    """Its pid names some process there, not here: wait for its lease."""
    host, pid = socket.gethostname(), _dead_pid()
    assert not owner_is_gone(f"{host}:{pid}:engine@000000000000.{os.getpid()}")
    assert not owner_is_gone(f"{host}:{pid}:engine")  # written before the pid space was named


@pytest.mark.parametrize(
    "owner",
    ["", ":", "::", "a:b:c@", "host:-1:x@{space}", "host:0x10:x@{space}",
     "host:99999999999999999999:x@{space}", "host:1:x@{space}@", "\udc00:1:x@{space}"],
)  # fmt: skip
def test_an_owner_it_cannot_read_is_never_gone(owner: str) -> None:
    assert not owner_is_gone(owner.replace("{space}", _space()))
