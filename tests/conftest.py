"""Shared helpers for the test suite: real SQLite files in tmp_path, real
processes, trio's MockClock where time is the subject."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings

settings.register_profile("thorough", max_examples=2000, deadline=None)
settings.register_profile("ci", deadline=None)
settings.register_profile("fuzz", max_examples=500, deadline=None)  # make fuzz: per batch
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

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
