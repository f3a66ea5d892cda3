"""Large documents do not stall other clients: ``command/list`` latency on one
connection while another streams changes to, or re-opens, a large document.

    .venv/bin/python -m bench.documents [--changes 50000] [--size 4000000]
        [--reopen-size 15000000] [--python-path DIR]

One real ``dovecote serve --listen unix:...`` subprocess, two connections:

* the **prober** sends ``command/list`` (``limit: 1``) every ~10 ms, one at a
  time, and records each answer's latency;
* the **loader** opens a document of ``--size`` code points (prose with
  multibyte letters and emoji), submits a call about a region in its middle
  (``#hang``, so the region stays live and every change moves it), then
  either streams ``--changes`` ``document/change`` notifications of one
  keystroke each (typing, deleting, at scattered places) as fast as the
  socket takes them, or re-opens a document of ``--reopen-size`` code points
  with ``document/open`` carrying other text (a word changed every ~100,000
  code points, so the rebase has a real diff to do), ``--rounds`` times,
  with that text and the first in turn.

A last row takes the server's frame decoding out: the event loop's longest
waits (1 ms ticks of a task in this process) while ``Mirror.open`` alone does
the same re-opens, which is what this module's part of the server costs.

The floor is the prober's latency with no load, measured in the same run
against the same server. Target: the load delays the p99 answer by < 50 ms
(p99 under load minus the floor's p99). ``--python-path`` runs the server
from another checkout (e.g. a ``git worktree`` of an older commit), for a
before/after comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from bench._common import Row, fresh_dir, headline, percentile, verdict
from editor_bridge.framing import FrameReader, encode
from editor_bridge.mirror import Mirror

URI = "file:///big.txt"
WORDS = ["the", "quick", "brown", "fox", "jumps", "über", "niño", "🦆", "lazy", "dog,", "naïve"]
PROBE_EVERY = 0.010
TARGET_MS = 50.0


def prose(size: int, seed: int) -> str:
    rng = random.Random(seed)
    words = []
    length = 0
    while length < size:
        word = rng.choice(WORDS)
        words.append(word)
        length += len(word) + 1
    return " ".join(words)[:size]


class Client:
    """One connection: requests answered in order (notifications skipped)."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.reader = FrameReader(stream, 1 << 30)
        self.next_id = 0

    async def notify(self, method: str, params: Any) -> None:
        await self.stream.send_all(encode({"jsonrpc": "2.0", "method": method, "params": params}))

    async def request(self, method: str, params: Any) -> Any:
        self.next_id += 1
        message = {"jsonrpc": "2.0", "id": self.next_id, "method": method, "params": params}
        await self.stream.send_all(encode(message))
        while True:
            frame = await self.reader.read()
            if frame is None or frame.body is None:
                raise RuntimeError("the server closed the connection")
            answer = json.loads(frame.body)
            if answer.get("id") == self.next_id:
                if "error" in answer:
                    raise RuntimeError(f"{method}: {answer['error']}")
                return answer.get("result")


async def connect(path: str, token: str) -> Client:
    client = Client(await trio.open_unix_socket(path))
    await client.request("initialize", {"token": token, "clientInfo": {"name": "bench"}})
    return client


async def probe_while(client: Client, load: Callable[[], Awaitable[None]]) -> list[float]:
    """Latencies (s) of probes sent every ``PROBE_EVERY`` while ``load`` runs."""
    latencies: list[float] = []
    async with trio.open_nursery() as nursery:

        async def probe() -> None:
            while True:
                started = time.perf_counter()
                await client.request("command/list", {"limit": 1})
                latencies.append(time.perf_counter() - started)
                await trio.sleep(PROBE_EVERY)

        nursery.start_soon(probe)
        await load()
        nursery.cancel_scope.cancel()
    return latencies


async def open_with_region(loader: Client, text: str) -> None:
    await loader.notify("document/open", {"uri": URI, "version": 1, "text": text})
    middle = len(text) // 2
    await loader.request(
        "command/submit",
        {
            "adapter": "scripted",
            "request": {"messages": [{"role": "user", "content": "#hang\nfix"}]},
            "target": {"uri": URI, "start": middle, "end": middle + 40},
            "timeout": 3600,
        },
    )


def change_frames(size: int, changes: int) -> list[bytes]:
    """``changes`` keystrokes (typing, deleting) at scattered places, encoded."""
    rng = random.Random(2)
    length, frames = size, []
    for version in range(2, changes + 2):
        at = rng.randrange(length)
        if rng.random() < 0.7:
            change = {"start": at, "end": at, "text": rng.choice("aé🦆 ")}
            length += 1
        else:
            change = {"start": at, "end": at + 1, "text": ""}
            length -= 1
        params = {"uri": URI, "version": version, "changes": [change]}
        frames.append(encode({"jsonrpc": "2.0", "method": "document/change", "params": params}))
    return frames


def reopen_frames(text: str, rounds: int) -> list[bytes]:
    """``rounds`` re-opens, with another text (a word changed every ~100,000 code
    points) and ``text`` in turn, encoded."""
    words = text.split(" ")
    for index in range(0, len(words), 20_000):
        words[index] = "CHANGED"
    texts = [" ".join(words), text]
    return [
        encode(
            {
                "jsonrpc": "2.0",
                "method": "document/open",
                "params": {"uri": URI, "version": version, "text": texts[version % 2]},
            }
        )
        for version in range(2, rounds + 2)
    ]


async def send(loader: Client, frames: list[bytes], batch: int) -> float:
    """Send ``frames``, ``batch`` at a time, each batch followed by a request, so
    that the server has handled it before the next is sent. Seconds per batch.
    The frames are encoded beforehand: the prober shares this process, and must
    not wait for the loader's own work."""
    started = time.perf_counter()
    for start in range(0, len(frames), batch):
        await loader.stream.send_all(b"".join(frames[start : start + batch]))
        await loader.request("command/list", {"limit": 1})
    return (time.perf_counter() - started) / -(-len(frames) // batch)


async def mirror_lag(text: str, rounds: int) -> list[float]:
    """The mirror's own share of a re-open, in this process: the gaps (s) between
    the ticks of a task that sleeps 1 ms, while ``Mirror.open`` re-opens ``text``
    as ``reopen_frames`` does. What the server pays on top (decoding the frame's
    JSON) is not in it."""
    words = text.split(" ")
    for index in range(0, len(words), 20_000):
        words[index] = "CHANGED"
    texts = [" ".join(words), text]
    mirror = Mirror()
    await mirror.open(URI, 1, text)
    mirror.track(URI, "region", len(text) // 2, len(text) // 2 + 40)
    gaps: list[float] = []
    async with trio.open_nursery() as nursery:

        async def tick() -> None:
            last = time.perf_counter()
            while True:
                await trio.sleep(0.001)
                now = time.perf_counter()
                gaps.append(now - last)
                last = now

        nursery.start_soon(tick)
        for version in range(2, rounds + 2):
            await trio.sleep(0.05)  # ticks on either side of each re-open
            await mirror.open(URI, version, texts[version % 2])
        await trio.sleep(0.05)
        nursery.cancel_scope.cancel()
    return gaps


def start_server(db: Path, sock: str, python_path: str | None) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    if python_path:
        env["PYTHONPATH"] = python_path
    command = [sys.executable, "-c", "from flows.cli import main; main()"]
    return subprocess.Popen(
        [*command, "serve", "--listen", f"unix:{sock}", "--db", str(db), "--max-frame", "67108864"],
        env=env,
        cwd=db.parent,  # not this checkout: ``-c`` puts the working directory first on sys.path
        stderr=subprocess.DEVNULL,
    )


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    with fresh_dir("documents") as tmp:
        db, sock = tmp / "dovecote.db", str(tmp / "dovecote.sock")
        process = start_server(db, sock, args.python_path)
        try:
            token_file = db.with_name(db.name + ".token")
            with trio.fail_after(30):
                while not (Path(sock).exists() and token_file.exists()):
                    await trio.sleep(0.05)
            token = token_file.read_text().strip()
            prober = await connect(sock, token)
            result: dict[str, Any] = {}
            result["floor"] = await probe_while(prober, lambda: trio.sleep(2))

            loader = await connect(sock, token)
            text = prose(args.size, 1)
            await open_with_region(loader, text)

            frames = change_frames(args.size, args.changes)

            async def changes() -> None:
                result["changes_s"] = await send(loader, frames, len(frames))

            result["changes"] = await probe_while(prober, changes)

            big = prose(args.reopen_size, 3)
            await loader.notify("document/close", {"uri": URI})
            await open_with_region(loader, big)
            frames = reopen_frames(big, args.rounds)
            await trio.sleep(0.5)

            async def reopened() -> None:
                result["reopen_s"] = await send(loader, frames, 1)

            result["reopen"] = await probe_while(prober, reopened)
            if args.python_path is None:  # this checkout's mirror, not the server's
                result["mirror"] = await mirror_lag(big, args.rounds)
            return result
        finally:
            process.kill()
            process.wait()


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--changes", type=int, default=50_000)
    parser.add_argument("--size", type=int, default=4_000_000)
    parser.add_argument("--reopen-size", type=int, default=15_000_000)
    parser.add_argument("--rounds", type=int, default=6, help="re-opens, one after another")
    parser.add_argument("--python-path", default=None)
    args = parser.parse_args(argv)
    result = trio.run(measure, args)
    floor = percentile(result["floor"], 99) * 1000
    print(f"{'load':<44}{'probes':>7}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}{'each s':>8}")
    loads = [
        ("none (floor)", "floor", None),
        (f"{args.changes:,} changes, {args.size:,} code points", "changes", "changes_s"),
        (f"{args.rounds} re-opens, {args.reopen_size:,} code points", "reopen", "reopen_s"),
        ("  the mirror's part alone: loop gaps", "mirror", None),
    ]
    rows = []
    for title, key, seconds in loads:
        if key not in result:
            continue
        values = result[key]
        p50, p99 = percentile(values, 50) * 1000, percentile(values, 99) * 1000
        took = f"{result[seconds]:>8.2f}" if seconds else f"{'-':>8}"
        print(f"{title:<44}{len(values):>7}{p50:>9.2f}{p99:>9.2f}{max(values) * 1000:>9.2f}{took}")
        if seconds:
            delay = p99 - floor
            rows.append(
                headline(
                    f"command/list p99 while another client sends {title}",
                    f"{p99:.1f} ms (+{delay:.1f} ms)",
                    baseline=f"no load {floor:.1f} ms",
                    ratio=f"{p99 / floor:.1f}x",
                    target=f"delay < {TARGET_MS:.0f} ms",
                    met=delay < TARGET_MS,
                )
            )
    for row in rows:
        met = verdict(row["met"])
        print(f"{row['benchmark']}: {row['dovecote']}; target {row['target']}: {met}")
    return rows


if __name__ == "__main__":
    main()
