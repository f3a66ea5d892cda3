"""dovecote.nvim in a real headless Neovim against the real ``dovecote serve``.

The cases are Lua (``editor_bridge/nvim/tests/cases.lua``, run by
``run.lua`` in one Neovim, each against its own server and database); each
is one pytest case here, so a failure names the case and shows its
traceback. A missing Neovim skips, or fails under CI=true (``make
nvim-test`` installs it when run as root).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from typing import Any

import pytest

from tests.conftest import DOVECOTE, ROOT, require_tool

PLUGIN = ROOT / "editor_bridge" / "nvim"
CASES = re.findall(
    r'^test\("([a-z0-9_]+)"', (PLUGIN / "tests" / "cases.lua").read_text(), re.MULTILINE
)


def nvim_command(nvim: str) -> list[str]:
    """Neovim with nothing of the user's, the plugin on the runtime path."""
    return [
        nvim,
        "--headless",
        "-u",
        "NONE",
        "-i",
        "NONE",
        "--cmd",
        f"set rtp^={PLUGIN}",
        "-c",
        "runtime plugin/dovecote.lua",
        "-c",
        f"luafile {PLUGIN / 'tests' / 'run.lua'}",
    ]


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str]:
    nvim = require_tool(os.environ.get("NVIM", "nvim"))
    version = subprocess.run([nvim, "--version"], capture_output=True, text=True).stdout
    found = re.match(r"NVIM v(\d+)\.(\d+)\.(\d+)", version)
    assert found and tuple(map(int, found.groups())) >= (0, 7, 2), f"Neovim too old: {version}"
    home = tmp_path_factory.mktemp("nvim")
    results = home / "results.json"
    env = {
        **os.environ,
        "DOVECOTE": DOVECOTE,
        "DOVECOTE_NVIM_RESULTS": str(results),
        # Neovim's own files (the LSP log, shada) stay out of the user's home.
        "XDG_CACHE_HOME": str(home / "cache"),
        "XDG_STATE_HOME": str(home / "state"),
        "XDG_DATA_HOME": str(home / "data"),
        "XDG_CONFIG_HOME": str(home / "config"),
    }
    env.pop("DOVECOTE_DB", None)
    run = subprocess.run(
        nvim_command(nvim),
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
    output = run.stdout + run.stderr
    if not results.exists():
        pytest.fail(f"Neovim wrote no results (exit {run.returncode}):\n{output}")
    return json.loads(results.read_text()), output


def test_every_case_is_found() -> None:
    assert len(CASES) >= 15 and len(set(CASES)) == len(CASES)


@pytest.mark.parametrize("case", CASES)
def test_nvim(suite: tuple[dict[str, Any], str], case: str) -> None:
    results, output = suite
    result = results.get(case)
    assert result is not None, f"{case} did not run:\n{output}"
    assert result["ok"], result["error"]
