"""``dovecote demo``: the whole life of a batch of calls, in a few seconds.

It runs on the scripted adapter by default (no key, no network): a dozen
calls, some of which are slow, fail, retry, or never answer; their states
move on a live line; the dead letters are listed; a reply that comes too
late is kept; the dead letters are replayed; a summary closes.
"""

from __future__ import annotations

import os
import re
import sys
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TextIO

import attrs
import trio

from adapters.base import Adapter, Price
from adapters.scripted import MISSPELLINGS, correct
from flows.builtin import correction_request
from flows.engine import Engine, open_engine
from flows.location import is_postgres_url, shown
from flows.records import Command, StateChange
from flows.render import COMMAND_HEADERS, command_rows, table
from flows.states import COMMAND_STATES, DEAD, DONE, REASON_TIMEOUT, TERMINAL_STATES


@attrs.frozen
class Call:
    what: str
    text: str
    timeout: float = 5.0
    max_attempts: int = 3


SCRIPTED_BATCH: tuple[Call, ...] = (
    Call("quick", "Teh quick brown fox jumps over teh lazy dog."),
    Call("quick", "I recieve your letter and beleive every word."),
    Call("slow (0.5 s)", "#delay 0.5\nWe will meet tommorow at teh libary."),
    Call("slow (0.8 s)", "#delay 0.8\nIt was a wierd occassion, definately."),
    Call("flaky: fails twice with 503, then answers", "#fail-times 2\nSeperate teh two."),
    Call("too slow for its 1 s timeout", "#delay 1.6\nThis calender is noticable.", 1.0),
    Call("never answers (1 s timeout)", "#hang\nWich freind said that?", 1.0),
    Call("bad request (HTTP 400)", "#fail 400\nThis one is malformed.", 5.0),
    Call("overloaded (503 every time)", "#fail 503\nTry me later.", 5.0, 2),
    Call("quick", "Untill teh end, truely."),
    Call("slow (0.3 s)", "#delay 0.3\nTeh goverment enviroment."),
    Call("quick", "A succesful, persistant suprise."),
)


def _batch_for(adapter: str, free: bool) -> Sequence[Call]:
    """The scripted batch; for a real model its texts without directives, all
    of them when its calls cost nothing (a model on this machine), else four."""
    if adapter == "scripted":
        return SCRIPTED_BATCH
    texts = [c.text.split("\n")[-1] for c in SCRIPTED_BATCH]
    return [Call("correction", text, 60.0) for text in (texts if free else texts[:4])]


def ask(text: str) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": text}]}


def _words(text: str) -> list[str]:
    return [word.lower() for word in re.findall(r"[A-Za-z]+", text)]


def misspellings_fixed(text: str, reply: str) -> tuple[int, int]:
    """(fixed, found): how many of the scripted adapter's misspellings ``text``
    holds, and how many of them ``reply`` has put right — one fewer of the
    wrong word for one more of the right one, wherever the reply puts it."""
    before, after = _words(text), _words(reply)
    fixed = found = 0
    for wrong, right in MISSPELLINGS.items():
        count = before.count(wrong)
        if count:
            found += count
            gained = after.count(right) - before.count(right)
            fixed += max(0, min(count - after.count(wrong), gained))
    return fixed, found


class LiveLine:
    """Counts of commands by state, redrawn in place on a terminal, printed
    as plain lines (at most twice a second) otherwise."""

    def __init__(self, out: TextIO, ids: set[str]) -> None:
        self.out = out
        self.ids = ids
        self.states: dict[str, str] = {}
        self.tty = out.isatty()
        self.last = ""

    def update(self, change: StateChange) -> None:
        if change.command.id in self.ids:
            self.states[change.command.id] = change.command.state

    def render(self) -> str:
        counts = Counter(self.states.values())
        return "  ".join(f"{s} {counts.get(s, 0)}" for s in COMMAND_STATES)

    def draw(self, final: bool = False) -> None:
        line = self.render()
        if line == self.last and not (final and self.tty):
            return
        self.last = line
        if self.tty:
            self.out.write("\r  " + line + ("\n" if final else ""))
        else:
            self.out.write("  " + line + "\n")
        self.out.flush()


async def _watch(engine: Engine, ids: set[str], out: TextIO, until: Callable[[], bool]) -> None:
    live = LiveLine(out, ids)
    for command_id in ids:
        live.states[command_id] = engine.get(command_id).state
    with engine.subscribe() as notices:
        while not until():
            with trio.move_on_after(0.1 if live.tty else 0.5):
                async for notice in notices:
                    if isinstance(notice, StateChange):
                        live.update(notice)
            live.draw()
        for command_id in ids:
            live.states[command_id] = engine.get(command_id).state
        live.draw(final=True)


async def _run_batch(engine: Engine, ids: list[str], out: TextIO) -> None:
    remaining = set(ids)
    done = trio.Event()

    async def wait_all() -> None:
        for command_id in ids:
            await engine.wait(command_id)
            remaining.discard(command_id)
        done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(wait_all)
        nursery.start_soon(_watch, engine, set(ids), out, done.is_set)


def _score(say: Callable[[str], None], commands: Sequence[Command]) -> None:
    """What a real model made of each text, and how many misspellings it fixed."""
    fixed = found = exact = 0
    say("")
    for command in commands:
        text = command.request.last_user_text
        reply = command.reply.text.strip() if command.reply else f"({command.state})"
        shown = " / ".join(reply.split("\n"))
        say(f"   {text}\n    -> {shown if len(shown) <= 120 else shown[:117] + '...'}")
        counts = misspellings_fixed(text, reply)
        fixed, found = fixed + counts[0], found + counts[1]
        exact += reply == correct(text)
    say("")
    say(
        f"   The model fixed {fixed} of the {found} misspellings in these texts; "
        f"{exact} of {len(commands)} replies are exactly the corrected text."
    )


async def run_demo(
    db: str | os.PathLike[str],
    adapter: str = "scripted",
    adapters: Sequence[Adapter] = (),
    out: TextIO = sys.stdout,
    epilogue: Callable[[Engine, TextIO], Awaitable[None]] | None = None,
) -> int:
    """The demo; ``epilogue`` runs last on the same engine (the CLI passes
    the editor bridge's editing session, which ``flows`` cannot import)."""

    def say(text: str = "") -> None:
        print(text, file=out, flush=True)

    start = trio.current_time()
    async with open_engine(db, adapters=adapters) as engine:
        if adapter not in engine.adapters:
            known = ", ".join(sorted(engine.adapters))
            say(f"dovecote demo: no adapter named {adapter!r} (configured: {known})")
            return 2
        calls = _batch_for(adapter, engine.adapters[adapter].settings.price == Price())
        say(f"dovecote demo — database {shown(db)}, adapter {adapter!r}")
        say("")
        say(
            f"1. Submitting {len(calls)} calls. "
            "Each is a row in the pending table; watch them move:"
        )
        ids = [
            await engine.submit(
                adapter,
                # A real model is asked as the corrections flow asks it.
                ask(call.text) if adapter == "scripted" else correction_request(call.text),
                timeout=call.timeout,
                max_attempts=call.max_attempts,
            )
            for call in calls
        ]
        await _run_batch(engine, ids, out)
        commands = [engine.get(i) for i in ids]
        say("")
        say(
            table(
                ("call", "state", "reason", "attempts", "reply"),
                [
                    [
                        call.what,
                        c.state,
                        c.reason or "",
                        c.attempt,
                        (c.reply.text if c.reply else "").splitlines()[-1][:44] if c.reply else "",
                    ]
                    for call, c in zip(calls, commands, strict=True)
                ],
            )
        )

        if adapter != "scripted":
            _score(say, commands)

        dead = [c for c in commands if c.state == DEAD]
        say("")
        say(f"2. {len(dead)} dead letters: nothing was dropped; each waits for a decision.")
        if dead:
            say(table(COMMAND_HEADERS, command_rows(dead, engine.now())))

        hung = [
            c for c in dead if c.reason == REASON_TIMEOUT and "#hang" in c.request.last_user_text
        ]
        if hung:
            say("")
            say(f"3. A reply for {hung[0].id} arrives after its deadline (say, a person typed it).")
            delivery = await engine.deliver(hung[0].id, {"text": "Which friend said that?"})
            say(
                f"   accepted={delivery.accepted} late={delivery.late}: "
                "kept as a late reply, not applied."
            )

        timed_out = [c for c in dead if c.reason == REASON_TIMEOUT]
        replay_ids: list[str] = []
        if timed_out:
            say("")
            say(
                f"4. Replaying the {len(timed_out)} timed-out calls with a 5 s timeout "
                "(the late reply is used instead of calling the model again):"
            )
            replay_ids = await engine.replay(
                [c.id for c in timed_out], timeout=5.0, use_late_reply=True
            )
            await _run_batch(engine, replay_ids, out)
            replays = [engine.get(i) for i in replay_ids]
            say(
                table(
                    ("dead letter", "replayed as", "state", "how", "reply"),
                    [
                        [
                            r.replay_of,
                            r.id,
                            r.state,
                            "late reply" if r.sent_at is None else f"sent, {r.attempt} attempt(s)",
                            r.reply.text if r.reply else "",
                        ]
                        for r in replays
                    ],
                )
            )
        final = [engine.get(i) for i in ids + replay_ids]
        states = Counter(c.state for c in final)
        replayed = {engine.get(i).replay_of for i in replay_ids}
        left_dead = [c for c in final if c.state == DEAD and c.id not in replayed]
        elapsed = trio.current_time() - start
        say("")
        say(
            f"Summary: {len(ids)} calls, {len(replay_ids)} replays, "
            f"{states.get(DONE, 0)} done, {len(left_dead)} still dead "
            f"({', '.join(sorted({c.reason or '' for c in left_dead})) or 'none'}), "
            f"{sum(c.attempt for c in final if c.sent_at)} sends, {elapsed:.1f} s."
        )
        assert all(c.state in TERMINAL_STATES for c in final)
        if epilogue is not None and adapter == "scripted":
            say("")
            await epilogue(engine, out)
        say("")
        say("Look around:")
        say("  dovecote dead                 the dead letters still waiting for a decision")
        say(f"  dovecote show {ids[0]}   one command and its journal")
        say("  dovecote stats                counts, tokens and cost")
        look = "psql" if is_postgres_url(db) else "sqlite3"
        say(f"  {look} {shown(db)} 'select state, count(*) from commands group by state'")
    return 0
