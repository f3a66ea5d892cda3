"""JSON-RPC round trip over stdio: ``dovecote serve --stdio`` against a bare
framing loop.

    .venv/bin/python -m bench.rpc [--n 5000] [--runs 5]

Both servers are subprocesses spoken to through pipes by the same client,
with the same frames (LSP ``Content-Length`` framing, ``command/list`` with
``limit: 1`` on a database holding one command). The floor, ``bare loop``,
is a Python process that reads a frame, parses its JSON and writes a
response frame: what any server in this language pays before doing work.

* latency: one request at a time, p50/p99 of the round trip;
* throughput: ``--n`` requests written at once (pipelined), messages/s
  until every response is read.

Medians of ``--runs`` runs, with min and max.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import IO, Any

from bench._common import Row, headline

BARE = r"""
import json, sys
inp, out = sys.stdin.buffer, sys.stdout.buffer
while True:
    header = b""
    while not header.endswith(b"\r\n\r\n"):
        c = inp.read(1)
        if not c:
            sys.exit(0)
        header += c
    length = int(header.split(b":")[1].split(b"\r\n")[0])
    message = json.loads(inp.read(length))
    answer = {"jsonrpc": "2.0", "id": message.get("id"), "result": {"commands": []}}
    body = json.dumps(answer).encode()
    out.write(b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    out.flush()
"""


def frame(message: dict[str, Any]) -> bytes:
    body = json.dumps(message).encode()
    return b"Content-Length: %d\r\n\r\n%s" % (len(body), body)


def read_frame(stream: IO[bytes]) -> dict[str, Any]:
    header = b""
    while not header.endswith(b"\r\n\r\n"):
        chunk = stream.read(1)
        if not chunk:
            raise EOFError("server closed")
        header += chunk
    length = int(header.split(b":")[1].split(b"\r\n")[0])
    answer: dict[str, Any] = json.loads(stream.read(length))
    return answer


class Client:
    def __init__(self, command: list[str]) -> None:
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert self.process.stdin is not None and self.process.stdout is not None
        self.out, self.inp = self.process.stdin, self.process.stdout
        self.next_id = 0

    def call(self, method: str, params: Any) -> dict[str, Any]:
        self.send(method, params)
        return self.answer()

    def answer(self) -> dict[str, Any]:
        """The next response, past any notification. The setup's submit
        makes the server send five (``command/state``, ``command/progress``):
        counted as answers, every later call would read the answer of the
        request five before it, already waiting in the pipe, and time nothing."""
        while True:
            message = read_frame(self.inp)
            if "id" in message:
                return message

    def send(self, method: str, params: Any) -> None:
        self.next_id += 1
        self.out.write(
            frame({"jsonrpc": "2.0", "id": self.next_id, "method": method, "params": params})
        )
        self.out.flush()

    def close(self) -> None:
        self.process.kill()
        self.process.wait()


def measure(client: Client, n: int) -> tuple[float, float, float]:
    """(p50 ms, p99 ms, messages/s)."""
    for _ in range(200):  # warm up
        client.call("command/list", {"limit": 1})
    latencies = []
    for _ in range(min(n, 2000)):
        start = time.perf_counter()
        client.call("command/list", {"limit": 1})
        latencies.append((time.perf_counter() - start) * 1000)
    latencies.sort()
    payload = b"".join(
        frame({"jsonrpc": "2.0", "id": i, "method": "command/list", "params": {"limit": 1}})
        for i in range(n)
    )

    def write() -> None:
        client.out.write(payload)
        client.out.flush()

    # Written from a thread while this one reads: with both pipes full, a
    # writer that reads nothing until it is done would wait forever.
    writer = threading.Thread(target=write)
    start = time.perf_counter()
    writer.start()
    for _ in range(n):
        client.answer()
    writer.join()
    rate = n / (time.perf_counter() - start)
    return latencies[len(latencies) // 2], latencies[int(len(latencies) * 0.99)], rate


def dovecote_client(db: Path) -> Client:
    exe = str(Path(sys.executable).with_name("dovecote"))
    client = Client([exe, "serve", "--stdio", "--db", str(db)])
    client.call("initialize", {"clientInfo": {"name": "bench"}})
    answer = client.call(
        "command/submit",
        {"adapter": "scripted", "request": {"messages": [{"role": "user", "content": "teh"}]}},
    )
    assert "result" in answer, answer
    return client


def run(n: int = 5000, runs: int = 5) -> list[dict[str, Any]]:
    rows = []
    for name in ("dovecote serve --stdio", "bare framing loop"):
        samples = []
        for _ in range(runs):
            with tempfile.TemporaryDirectory() as tmp:
                if name.startswith("dovecote"):
                    client = dovecote_client(Path(tmp) / "dovecote.db")
                else:
                    client = Client([sys.executable, "-c", BARE])
                try:
                    samples.append(measure(client, n))
                finally:
                    client.close()
        rows.append(
            {
                "benchmark": "JSON-RPC round trip over stdio (command/list)",
                "system": name,
                "p50_ms": statistics.median(s[0] for s in samples),
                "p99_ms": statistics.median(s[1] for s in samples),
                "messages_per_s": statistics.median(s[2] for s in samples),
                "min_per_s": min(s[2] for s in samples),
                "max_per_s": max(s[2] for s in samples),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args(argv)
    rows = run(args.n, args.runs)
    print(f"{'system':<26}{'p50 ms':>8}{'p99 ms':>8}{'msgs/s':>10}{'min':>9}{'max':>9}")
    for r in rows:
        print(
            f"{r['system']:<26}{r['p50_ms']:>8.3f}{r['p99_ms']:>8.3f}"
            f"{r['messages_per_s']:>10,.0f}{r['min_per_s']:>9,.0f}{r['max_per_s']:>9,.0f}"
        )
    dovecote, bare = rows
    print(
        f"dovecote / bare loop: {dovecote['messages_per_s'] / bare['messages_per_s']:.2f}x "
        f"throughput; p50 {dovecote['p50_ms']:.3f} ms (target < 1 ms: "
        f"{'met' if dovecote['p50_ms'] < 1 else 'MISSED'}), "
        f"{dovecote['messages_per_s']:,.0f} msgs/s (target >= 10,000: "
        f"{'met' if dovecote['messages_per_s'] >= 10_000 else 'MISSED'})"
    )
    return [
        headline(
            "JSON-RPC round trip over stdio, p50",
            f"{dovecote['p50_ms']:.3f} ms",
            baseline=f"bare framing loop {bare['p50_ms']:.3f} ms",
            ratio=f"{dovecote['p50_ms'] / bare['p50_ms']:.2f}x",
            target="< 1 ms",
            met=dovecote["p50_ms"] < 1,
        ),
        headline(
            "JSON-RPC pipelined throughput over stdio",
            f"{dovecote['messages_per_s']:,.0f} msgs/s",
            baseline=f"bare framing loop {bare['messages_per_s']:,.0f} msgs/s",
            ratio=f"{dovecote['messages_per_s'] / bare['messages_per_s']:.2f}x",
            target=">= 10,000 msgs/s",
            met=dovecote["messages_per_s"] >= 10_000,
        ),
    ]


if __name__ == "__main__":
    main()
