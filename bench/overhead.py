"""What dovecote adds to an HTTP call: dovecote against raw ``httpx`` on one local server.

Run from the repository root::

    .venv/bin/python -m bench.overhead [--n 1000] [--runs 5] [--rounds 3] [--serial 25]
        [--cold] [--delay 0.05] [--transport stack|httpcore] [--json] [--profile]

(``--profile`` needs ``pyinstrument``, in the ``bench`` extra:
``.venv/bin/pip install -e '.[bench]'``.)

What is measured
----------------
A local OpenAI-compatible server answers every ``POST /v1/chat/completions`` 50 ms
after the request has arrived, with a fixed ~400-byte completion (usage included). It
is an ``asyncio.Protocol`` (no task per request: a ``call_later`` per answer, HTTP/1.1
keep-alive, backlog 4096) in its own process, so that it shares no GIL with the
client; a raw-socket client gets 1,000 concurrent answers from it in under 0.1 s.

* **dovecote**: ``flows.open_engine`` on a fresh SQLite file with one ``OpenAIAdapter``
  (``max_in_flight`` = N, ``stream = false``, its own client, as in production); N tasks
  each ``submit`` a call and ``wait`` for it: every call is a durable command going
  ``pending -> sent -> replied -> done`` with its journal, and is checked afterwards
  (``done``, the server's text).
* **adapter alone**: the same adapter's ``send`` called by N tasks with no engine (no
  command, no commit): what dovecote's HTTP path costs, apart from the engine's. The
  CPU dovecote adds to a call is split in two in the same run: the HTTP path (adapter
  alone minus raw) and the engine (dovecote minus adapter alone).
* **raw httpx**: one ``httpx.AsyncClient`` with the same limits
  (``max_connections`` = ``max_keepalive_connections`` = N), the same body, headers and
  JSON decoding of the answer; N tasks each ``POST`` once.

All three run inside ``trio.run`` in this process, one after the other (runs rotate which
goes first), each run with a fresh engine on a fresh file or a fresh client. A run first
does one untimed round, which opens and pools N connections, then ``--rounds`` timed
rounds (3): the figures are the steady state. With ``--cold`` the timed rounds open
their connections as they go; a single cold round of about a second swung the ratio
from 0.56x to 0.99x between runs on the 2-core machine, which says more about the
machine than about either client.

Transport (``--transport``). ``stack`` (the default) is what an adapter builds for
itself (``HttpAdapter.http_client``): httpx over ``adapters._pool.PooledTransport``,
whose pool costs the same per request with 1 or 1,000 connections; raw httpx is given
the same transport, and the adapter hands its requests to it directly (see
``HttpAdapter._post``). ``httpcore`` gives all three httpx's own pool (the adapter an
injected client, which it uses through ``AsyncClient.send``), which in httpcore 1.0.x
scans every pooled connection (and, for each idle one, every connection again) on each
request and each release (encode/httpcore#1035): at 1,000 connections both fall to a
few dozen calls a second, which hides everything else.

* **throughput**: N / (seconds from the first submit or POST to the last answer);
  dovecote's ratio to raw is taken per run (same server, same moment), then the median.
* **added latency with N in flight**: per call, dovecote's ``replied_at - sent_at`` (the
  adapter's send as the engine sees it) and ``finished_at - created_at`` (the whole life,
  queueing and commits included) against raw's request time; p50/p99 per run, the
  median over runs, and the difference of the p50s (and p99s).
* **added latency, one call at a time** (``--serial`` calls): the same three times with a
  single call in flight, where they are not blurred by N calls sharing a CPU.
* **client CPU per call**: this process's CPU time over a timed round, divided by N
  (the server runs in another process and is not counted); and dovecote's minus raw's,
  the CPU that a durable command costs on top of its HTTP call.

Why the added latency with N in flight is the CPU added per call times about N/2: a
round starts N calls at once, and a 2-core machine cannot send 1,000 requests in 50 ms
(raw httpx alone needs about 0.5-1 ms of CPU a call, so its own p50 is hundreds of ms
of queueing, not the server's 50 ms). The median call waits for about half the others
to be processed before its own, so every microsecond a system adds to each call adds
about N/2 microseconds to the median: 1 ms at N = 1,000 allows 2 us a call, less than
one SQLite statement. The one-at-a-time rows are where the added latency of a single
call shows; the N-in-flight rows show what the added CPU does to a burst.

Every row reports the median over ``--runs`` (>= 5) with min and max. Targets (issue 15),
each printed met or MISSED: dovecote >= 90% of raw's throughput and <= 120 us of CPU
added per call with N in flight; <= 0.5 ms added to the p50 whole life of a call made
one at a time.

``run(...) -> list[dict]`` returns the rows for a later ``python -m bench`` runner.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import trio

import flows
from adapters._pool import PooledTransport
from adapters.base import AdapterSettings, Request, SendContext
from adapters.openai import OpenAIAdapter
from bench._common import (
    REPLY_TEXT,
    REQUEST,
    Row,
    fmt_str,
    fresh_dir,
    headline,
    percentile,
    print_spread,
)

BENCH = "overhead"
DELAY = 0.05
ROUNDS = 3
SERIAL = 25
MODEL = "bench-model"
TARGET_RATIO = 0.90
"""Issue 15: dovecote's throughput with N in flight, at least this share of raw httpx's."""
TARGET_CPU_ADDED = 120e-6
"""Issue 15: CPU seconds a durable command may add to its HTTP call, N in flight."""
TARGET_ALONE_LIFE = 0.0005
"""Issue 15: p50 whole life minus raw's p50 request, one call at a time."""
ROOT = Path(__file__).resolve().parent.parent

COMPLETION = json.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 1741570283,
        "model": MODEL,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": REPLY_TEXT},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 25, "completion_tokens": 25, "total_tokens": 50},
    }
).encode()


# --- the server (its own process) ----------------------------------------------------------


class _Connection(asyncio.Protocol):
    """HTTP/1.1 with keep-alive: each request (headers + Content-Length body) is answered
    ``delay`` seconds after it is complete, in arrival order per connection."""

    response = (
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
        + f"content-length: {len(COMPLETION)}\r\n".encode()
        + b"connection: keep-alive\r\n\r\n"
        + COMPLETION
    )

    def __init__(self, delay: float, counter: list[int]) -> None:
        self.delay = delay
        self.counter = counter
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        loop = asyncio.get_running_loop()
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            length = 0
            for line in self.buffer[:end].split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if len(self.buffer) < end + 4 + length:
                return
            self.buffer = self.buffer[end + 4 + length :]
            self.counter[0] += 1
            loop.call_later(self.delay, self._answer)

    def _answer(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(self.response)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


async def _serve(delay: float) -> None:
    loop = asyncio.get_running_loop()
    counter = [0]
    server = await loop.create_server(
        lambda: _Connection(delay, counter), "127.0.0.1", 0, backlog=4096, reuse_address=True
    )
    port = server.sockets[0].getsockname()[1]
    print(f"PORT {port}", flush=True)
    stop = asyncio.Event()
    # The parent closes our stdin to stop us (or dies, which closes it too).
    threading.Thread(
        target=lambda: (sys.stdin.read(), loop.call_soon_threadsafe(stop.set)), daemon=True
    ).start()
    async with server:
        await stop.wait()
    print(f"SERVED {counter[0]}", flush=True)


def _raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


@contextmanager
def server_process(delay: float = DELAY) -> Iterator[str]:
    """The server in a child process; yields its ``base_url`` (``.../v1``)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "bench.overhead", "--serve", "--delay", str(delay)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=ROOT,
        text=True,
    )
    assert process.stdin is not None and process.stdout is not None
    try:
        line = process.stdout.readline()
        if not line.startswith("PORT "):
            raise RuntimeError(f"the benchmark server did not start: {line!r}")
        yield f"http://127.0.0.1:{int(line.split()[1])}/v1"
    finally:
        process.stdin.close()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# --- the two clients -----------------------------------------------------------------------


def _limits(n: int) -> httpx.Limits:
    """What ``HttpAdapter.http_client`` gives an adapter with ``max_in_flight = n``."""
    return httpx.Limits(max_connections=n, max_keepalive_connections=n)


TRANSPORTS = ("stack", "httpcore")


def make_client(n: int, transport: str) -> httpx.AsyncClient:
    """The client both systems use: httpx over dovecote's constant-time pool
    (``stack``: ``adapters._pool.PooledTransport``, what an adapter builds for itself)
    or httpx's own (``httpcore``); same limits."""
    if transport not in TRANSPORTS:
        raise ValueError(f"transport must be one of {', '.join(TRANSPORTS)}")
    limits = _limits(n)
    if transport == "httpcore":
        return httpx.AsyncClient(limits=limits, headers={"user-agent": "dovecote"})
    return httpx.AsyncClient(
        transport=PooledTransport(n), limits=limits, headers={"user-agent": "dovecote"}
    )


class Round:
    """One timed round: its wall time, the CPU time this (client) process spent on it,
    and, per call, the send and whole-life latencies (the same list twice for raw
    httpx, whose call is its request)."""

    def __init__(self, seconds: float, send: list[float], life: list[float], cpu: float = 0.0):
        self.seconds = seconds
        self.send = send
        self.life = life
        self.cpu = cpu


BODY: dict[str, Any] = {"model": MODEL, **REQUEST}


async def _raw_call(client: httpx.AsyncClient, url: str) -> float:
    started = time.perf_counter()
    response = await client.post(
        url, json=BODY, headers={"accept": "application/json"}, timeout=httpx.Timeout(60)
    )
    response.raise_for_status()
    text = response.json()["choices"][0]["message"]["content"]
    elapsed = time.perf_counter() - started
    if text != REPLY_TEXT:
        raise RuntimeError(f"raw httpx: unexpected answer {text!r}")
    return elapsed


async def _round(call: Callable[[], Awaitable[float]], n: int) -> Round:
    """``n`` tasks each make one ``call`` (which returns its own latency)."""
    latencies = [0.0] * n

    async def one(index: int) -> None:
        latencies[index] = await call()

    started, cpu = time.perf_counter(), time.process_time()
    async with trio.open_nursery() as nursery:
        for index in range(n):
            nursery.start_soon(one, index)
    return Round(time.perf_counter() - started, latencies, latencies, time.process_time() - cpu)


async def _calls(
    call: Callable[[], Awaitable[float]], n: int, rounds: int, serial: int, warm: bool
) -> tuple[list[Round], Round]:
    """A warm-up round if ``warm``, ``rounds`` timed rounds, then ``serial`` calls one
    at a time."""
    if warm:
        await _round(call, n)
    timed = [await _round(call, n) for _ in range(rounds)]
    started = time.perf_counter()
    one_by_one = [await call() for _ in range(serial)]
    return timed, Round(time.perf_counter() - started, one_by_one, one_by_one)


async def raw_run(
    base_url: str, n: int, rounds: int, serial: int, transport: str, warm: bool
) -> tuple[list[Round], Round]:
    """A fresh client, as ``_calls`` says."""
    url = f"{base_url}/chat/completions"
    async with make_client(n, transport) as client:
        return await _calls(partial(_raw_call, client, url), n, rounds, serial, warm)


def _checked(engine: flows.Engine, ids: Sequence[str], seconds: float, cpu: float = 0.0) -> Round:
    send, life = [], []
    for command_id in ids:
        command = engine.get(command_id)
        if command.state != "done" or command.reply is None or command.reply.text != REPLY_TEXT:
            raise RuntimeError(f"dovecote: command {command_id} ended {command.state}: {command}")
        assert command.sent_at and command.replied_at and command.finished_at
        send.append(command.replied_at - command.sent_at)
        life.append(command.finished_at - command.created_at)
    return Round(seconds, send, life, cpu)


async def _dovecote_round(engine: flows.Engine, n: int) -> Round:
    ids = [""] * n

    async def one(index: int) -> None:
        ids[index] = await engine.submit("bench", REQUEST, timeout=60)
        await engine.wait(ids[index])

    started, cpu = time.perf_counter(), time.process_time()
    async with trio.open_nursery() as nursery:
        for index in range(n):
            nursery.start_soon(one, index)
    return _checked(engine, ids, time.perf_counter() - started, time.process_time() - cpu)


@asynccontextmanager
async def _adapter(base_url: str, n: int, transport: str) -> AsyncIterator[OpenAIAdapter]:
    """The adapter both dovecote systems use. With ``stack`` it builds its own client,
    as in production (its pool is the ``PooledTransport`` raw httpx is given); with
    ``httpcore`` it is given httpx's default client, as raw httpx is."""
    settings = AdapterSettings(name="bench", max_in_flight=n, timeout=60.0)
    client = make_client(n, transport) if transport == "httpcore" else None
    adapter = OpenAIAdapter(settings, base_url=base_url, model=MODEL, stream=False, client=client)
    try:
        yield adapter
    finally:
        await adapter.aclose()
        if client is not None:  # an injected client is left open by the adapter
            await client.aclose()


async def _adapter_call(adapter: OpenAIAdapter, request: Request) -> float:
    started = time.perf_counter()
    context = SendContext(
        command_id="bench", attempt=1, deadline=time.time() + 60, report_progress=_ignore
    )
    reply = await adapter.send(request, context)
    elapsed = time.perf_counter() - started
    if reply.text != REPLY_TEXT:
        raise RuntimeError(f"adapter alone: unexpected answer {reply.text!r}")
    return elapsed


def _ignore(_: str) -> None:
    pass


async def adapter_run(
    base_url: str, n: int, rounds: int, serial: int, transport: str, warm: bool
) -> tuple[list[Round], Round]:
    """The adapter's ``send`` with no engine behind it (no command, no commit), as
    ``_calls`` says: what dovecote's HTTP path costs against raw httpx's, apart from
    the engine's."""
    request = Request.from_json(REQUEST)
    async with _adapter(base_url, n, transport) as adapter:
        return await _calls(partial(_adapter_call, adapter, request), n, rounds, serial, warm)


@asynccontextmanager
async def _engine(base_url: str, n: int, transport: str) -> AsyncIterator[flows.Engine]:
    """A fresh engine on a fresh file, with the adapter of ``_adapter``."""
    with fresh_dir(BENCH) as directory:
        async with (
            _adapter(base_url, n, transport) as adapter,
            flows.open_engine(directory / "dovecote.db", adapters=[adapter]) as engine,
        ):
            yield engine


async def dovecote_run(
    base_url: str, n: int, rounds: int, serial: int, transport: str, warm: bool
) -> tuple[list[Round], Round]:
    """A fresh engine: a warm-up round if ``warm``, ``rounds`` timed rounds, then
    ``serial`` calls one at a time."""
    async with _engine(base_url, n, transport) as engine:
        if warm:
            await _dovecote_round(engine, n)
        timed = [await _dovecote_round(engine, n) for _ in range(rounds)]
        ids = []
        started = time.perf_counter()
        for _ in range(serial):
            ids.append(await engine.submit("bench", REQUEST, timeout=60))
            await engine.wait(ids[-1])
        alone = _checked(engine, ids, time.perf_counter() - started)
    return timed, alone


# --- runs and rows -------------------------------------------------------------------------


def _row(system: str, variant: str, measure: str, unit: str, values: Sequence[float]) -> Row:
    return {
        "bench": BENCH,
        "system": system,
        "variant": variant,
        "measure": measure,
        "unit": unit,
        "runs": len(values),
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
    }


def _latency_rows(
    variant: str,
    raw: Sequence[Round],
    adapter: Sequence[Round],
    ours: Sequence[Round],
    quantiles: Sequence[float] = (50, 99),
) -> list[Row]:
    """Per run: p-quantiles of raw's request time, the adapter's send alone, dovecote's
    send and life times, and the differences (minus raw, same run)."""
    rows = []
    for q in quantiles:
        name = f"p{q:g}"
        raw_q = [percentile(r.send, q) for r in raw]
        adapter_q = [percentile(r.send, q) for r in adapter]
        send_q = [percentile(r.send, q) for r in ours]
        life_q = [percentile(r.life, q) for r in ours]

        def minus_raw(values: list[float], raw_q: list[float] = raw_q) -> list[float]:
            return [a - b for a, b in zip(values, raw_q, strict=True)]

        rows += [
            _row("raw httpx", variant, f"{name} request", "s", raw_q),
            _row(ADAPTER, variant, f"{name} send", "s", adapter_q),
            _row("dovecote", variant, f"{name} send (replied_at - sent_at)", "s", send_q),
            _row("dovecote", variant, f"{name} life (finished_at - created_at)", "s", life_q),
            _row(f"{ADAPTER} - raw", variant, f"{name} added: send", "s", minus_raw(adapter_q)),
            _row("dovecote - raw", variant, f"{name} added: send", "s", minus_raw(send_q)),
            _row("dovecote - raw", variant, f"{name} added: life", "s", minus_raw(life_q)),
        ]
    return rows


ADAPTER = "adapter alone"
SYSTEMS = ("raw", "adapter", "dovecote")
RUNNERS = {"raw": raw_run, "adapter": adapter_run, "dovecote": dovecote_run}


def run(
    n: int = 1000,
    runs: int = 5,
    rounds: int = ROUNDS,
    serial: int = SERIAL,
    delay: float = DELAY,
    transport: str = "stack",
    warm: bool = True,
) -> list[Row]:
    """The three systems ``runs`` times, rotating which goes first; one row per
    measure."""
    _raise_fd_limit()
    timed: dict[str, list[list[Round]]] = {system: [] for system in SYSTEMS}
    alone: dict[str, list[Round]] = {system: [] for system in SYSTEMS}
    with server_process(delay) as base_url:
        for index in range(runs):
            for system in SYSTEMS[index % 3 :] + SYSTEMS[: index % 3]:
                rounds_run, one_by_one = trio.run(
                    RUNNERS[system], base_url, n, rounds, serial, transport, warm
                )
                timed[system].append(rounds_run)
                alone[system].append(one_by_one)

    def rate(of: list[Round]) -> float:
        return n * len(of) / sum(r.seconds for r in of)

    def cpu_per_call(of: list[Round]) -> float:
        return sum(r.cpu for r in of) / (n * len(of))

    def merged(of: list[Round]) -> Round:
        return Round(
            sum(r.seconds for r in of),
            [x for r in of for x in r.send],
            [x for r in of for x in r.life],
        )

    def pairwise(a: list[float], b: list[float], by: Any) -> list[float]:
        return [by(x, y) for x, y in zip(a, b, strict=True)]

    variant = f"{n} in flight"
    rates = {system: [rate(t) for t in timed[system]] for system in SYSTEMS}
    cpus = {system: [cpu_per_call(t) for t in timed[system]] for system in SYSTEMS}
    ratio, minus = (lambda a, b: a / b), (lambda a, b: a - b)
    name = {"raw": "raw httpx", "adapter": ADAPTER, "dovecote": "dovecote"}
    rows = [
        _row(name[system], variant, "throughput", "calls/s", rates[system]) for system in SYSTEMS
    ]
    for system in ("adapter", "dovecote"):
        ratios = pairwise(rates[system], rates["raw"], ratio)
        rows.append(_row(f"{name[system]} / raw", variant, "throughput ratio", "x", ratios))
    rows += [
        _row(name[system], variant, "client CPU per call", "cpu", cpus[system])
        for system in SYSTEMS
    ]
    for ours, theirs, measure in (
        ("adapter", "raw", "CPU added per call: HTTP path"),
        ("dovecote", "adapter", "CPU added per call: engine"),
        ("dovecote", "raw", "CPU added per call"),
    ):
        difference = pairwise(cpus[ours], cpus[theirs], minus)
        label = "raw" if theirs == "raw" else name[theirs]
        rows.append(_row(f"{name[ours]} - {label}", variant, measure, "cpu", difference))
    raw_m, adapter_m, ours_m = ([merged(t) for t in timed[system]] for system in SYSTEMS)
    rows += _latency_rows(variant, raw_m, adapter_m, ours_m)
    if serial:
        rows += _latency_rows("1 in flight", alone["raw"], alone["adapter"], alone["dovecote"])
    for row in rows:
        row.update(n=n, rounds=rounds, serial=serial, delay=delay, transport=transport, warm=warm)
    return rows


def _find(rows: Sequence[Row], system: str, variant: str, measure: str) -> Row:
    return next(
        r
        for r in rows
        if r["system"] == system and r["variant"] == variant and r["measure"] == measure
    )


def _targets(rows: Sequence[Row]) -> tuple[str, Row, Row, Row | None]:
    """The variant with N in flight and the three rows issue 15 sets targets for:
    throughput ratio, CPU added per call, whole-life p50 added one call at a time
    (None when no call was made one at a time)."""
    variant = next(r["variant"] for r in rows if r["measure"] == "throughput")
    ratio = _find(rows, "dovecote / raw", variant, "throughput ratio")
    cpu = _find(rows, "dovecote - raw", variant, "CPU added per call")
    life = next(
        (
            r
            for r in rows
            if r["system"] == "dovecote - raw"
            and r["variant"] == "1 in flight"
            and r["measure"] == "p50 added: life"
        ),
        None,
    )
    return variant, ratio, cpu, life


def _met(value: float, ok: bool) -> str:
    return "met" if ok else "MISSED"


def summary(rows: Sequence[Row]) -> list[str]:
    """The three targets, each met or MISSED, and where the added CPU goes."""
    variant, ratio, cpu, life = _targets(rows)
    http = _find(rows, f"{ADAPTER} - raw", variant, "CPU added per call: HTTP path")
    engine = _find(rows, f"dovecote - {ADAPTER}", variant, "CPU added per call: engine")
    lines = [
        f"throughput, {variant}: dovecote / raw httpx = {ratio['median']:.2f}x "
        f"(runs {ratio['min']:.2f}..{ratio['max']:.2f}); target >= {TARGET_RATIO:.2f}x "
        + _met(ratio["median"], ratio["median"] >= TARGET_RATIO),
        f"CPU added per call, {variant}: {cpu['median'] * 1e6:+.0f} us "
        f"(runs {cpu['min'] * 1e6:+.0f}..{cpu['max'] * 1e6:+.0f}) = HTTP path "
        f"{http['median'] * 1e6:+.0f} us + engine {engine['median'] * 1e6:+.0f} us (medians); "
        f"target <= {TARGET_CPU_ADDED * 1e6:.0f} us "
        + _met(cpu["median"], cpu["median"] <= TARGET_CPU_ADDED),
    ]
    if life is not None:
        lines.append(
            f"whole life added, p50, 1 in flight: {life['median'] * 1000:+.2f} ms "
            f"(runs {life['min'] * 1000:+.2f}..{life['max'] * 1000:+.2f}); "
            f"target <= {TARGET_ALONE_LIFE * 1000:g} ms "
            + _met(life["median"], life["median"] <= TARGET_ALONE_LIFE)
        )
    return lines


def headlines(rows: Sequence[Row]) -> list[Row]:
    """The summary-table rows, with the same targets as ``summary``."""
    variant, ratio, cpu, life = _targets(rows)
    ours = _find(rows, "dovecote", variant, "throughput")
    raw = _find(rows, "raw httpx", variant, "throughput")
    raw_cpu = _find(rows, "raw httpx", variant, "client CPU per call")
    out = [
        headline(
            f"HTTP throughput, {variant} (calls/s)",
            f"{ours['median']:,.0f}/s",
            baseline=f"raw httpx {raw['median']:,.0f}/s",
            ratio=f"{ratio['median']:.2f}x",
            target=f">= {TARGET_RATIO:.2f}x raw httpx",
            met=ratio["median"] >= TARGET_RATIO,
        ),
        headline(
            f"CPU added to an HTTP call, {variant}",
            f"{cpu['median'] * 1e6:+.0f} us",
            baseline=f"raw httpx {raw_cpu['median'] * 1e6:.0f} us",
            target=f"<= {TARGET_CPU_ADDED * 1e6:.0f} us",
            met=cpu["median"] <= TARGET_CPU_ADDED,
        ),
    ]
    if life is not None:
        alone = _find(rows, "raw httpx", "1 in flight", "p50 request")
        out.append(
            headline(
                "latency added to an HTTP call, p50, 1 in flight, whole life",
                f"{life['median'] * 1000:+.2f} ms",
                baseline=f"raw httpx p50 {alone['median'] * 1000:.2f} ms",
                target=f"<= {TARGET_ALONE_LIFE * 1000:g} ms",
                met=life["median"] <= TARGET_ALONE_LIFE,
            )
        )
    return out


def _fmt_value(row: Row, key: str) -> str:
    value = row[key]
    if row["unit"] == "s":
        return f"{value * 1000:+.2f} ms" if " - " in row["system"] else f"{value * 1000:.2f} ms"
    if row["unit"] == "x":
        return f"{value:.2f}x"
    if row["unit"] == "cpu":
        return f"{value * 1e6:+.0f} us" if " - " in row["system"] else f"{value * 1e6:.0f} us"
    return f"{value:,.0f}/s"


def print_rows(rows: Sequence[Row]) -> None:
    print_spread(
        rows,
        (
            ("variant", "variant", fmt_str),
            ("system", "system", fmt_str),
            ("measure", "measure", fmt_str),
        ),
        _fmt_value,
    )


# --- profile and command line ----------------------------------------------------------------


def profile(n: int, transport: str, rounds: int, warm: bool) -> None:
    """One dovecote run under pyinstrument: the warm-up round (unless ``--cold``)
    outside the profile, then ``rounds`` timed rounds of ``n`` inside it, so that
    the profile is of the steady state the figures are."""
    try:
        from pyinstrument import Profiler
    except ImportError:
        sys.exit("--profile needs pyinstrument: .venv/bin/pip install -e '.[bench]'")
    _raise_fd_limit()
    profiler = Profiler(interval=0.0005, async_mode="disabled")

    async def profiled(base_url: str) -> list[Round]:
        async with _engine(base_url, n, transport) as engine:
            if warm:
                await _dovecote_round(engine, n)
            profiler.start()
            try:
                return [await _dovecote_round(engine, n) for _ in range(rounds)]
            finally:
                profiler.stop()

    with server_process() as base_url:
        timed = trio.run(profiled, base_url)
    seconds = sum(r.seconds for r in timed)
    print(f"profiled: {rounds} round(s) of {n:,} calls in {seconds:.2f} s (slowed by the profiler)")
    print(profiler.output_text(unicode=False, color=False))


def main(argv: Sequence[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(prog="python -m bench.overhead", description=__doc__)
    parser.add_argument("--n", type=int, default=1000, help="calls in flight (default 1000)")
    parser.add_argument("--runs", type=int, default=5, help="runs per system (default 5)")
    parser.add_argument(
        "--rounds", type=int, default=ROUNDS, help=f"timed rounds per run (default {ROUNDS})"
    )
    parser.add_argument(
        "--serial", type=int, default=SERIAL, help=f"calls one at a time per run (default {SERIAL})"
    )
    parser.add_argument("--delay", type=float, default=DELAY, help="server delay (0.05 s)")
    parser.add_argument(
        "--transport",
        choices=TRANSPORTS,
        default="stack",
        help="stack: httpx with an O(1) pool, the same for both (default); httpcore: "
        "httpx's own pool, what an adapter builds for itself (slow at 1,000 connections)",
    )
    parser.add_argument(
        "--cold",
        action="store_true",
        help="no untimed warm-up round: the timed rounds open their connections as they go",
    )
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    parser.add_argument(
        "--profile", action="store_true", help="profile the timed rounds of one dovecote run"
    )
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        _raise_fd_limit()
        asyncio.run(_serve(args.delay))
        return []
    if args.profile:
        profile(args.n, args.transport, args.rounds, not args.cold)
        return []
    started = time.perf_counter()
    rows = run(
        args.n, args.runs, args.rounds, args.serial, args.delay, args.transport, not args.cold
    )
    if args.json:
        print(json.dumps(rows, indent=2))
        return headlines(rows)
    print(
        f"bench.overhead: {args.n} calls in flight against a local OpenAI-compatible server "
        f"answering after {args.delay * 1000:g} ms; transport {args.transport}; "
        f"median of {args.runs} runs "
        f"(min..max), {args.rounds} timed round(s) + {args.serial} one-at-a-time calls per run"
    )
    print()
    print_rows(rows)
    print()
    for line in summary(rows):
        print(line)
    print(f"(whole benchmark: {time.perf_counter() - started:.1f} s, pid {os.getpid()})")
    return headlines(rows)


if __name__ == "__main__":
    main()
