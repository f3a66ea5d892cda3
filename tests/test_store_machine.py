"""The Store against a model, with hypothesis' stateful testing.

A ``RuleBasedStateMachine`` drives the real ``Store`` on a real SQLite file
the way engines do: it submits, claims, replies, finishes, fails, times out,
retries, expires, cancels and replays commands, stores late replies, loses
races, commits batches where some operations lose their compare-and-set,
and closes and reopens the file. A plain-Python model says what every row,
journal and view must hold; the invariants compare them after every step.

Run it harder with ``pytest --hypothesis-profile=thorough
tests/test_store_machine.py`` (the profile registered in conftest).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

import attrs
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from adapters.base import Reply, Request, Usage
from flows.errors import StoreError
from flows.operations import TAKE_OVER
from flows.records import Command, CommandError, Event, LateReply, new_id
from flows.states import (
    CANCEL,
    COMMAND_EVENTS,
    COMMAND_STATES,
    COMMAND_TRANSITIONS,
    DEAD,
    DISPATCH,
    EXPIRE,
    FAIL,
    FINISH,
    PENDING,
    REPLIED,
    REPLY,
    RESOLVE,
    RETRY,
    SENT,
    TERMINAL_STATES,
    TIMEOUT,
    IllegalTransition,
    LostRace,
    next_state,
)
from flows.storage import StoreProtocol
from flows.store import (
    AddLateReply,
    Group,
    Insert,
    Move,
    Operation,
    ReleaseLeases,
    RenewLeases,
    TakeOver,
    UseLateReply,
)
from tests.stores import STORES, StoreKind, commit_one

MakeStore = Callable[[], StoreProtocol]


ADAPTERS = ("scripted", "other")
HANDLERS = (None, "h1", "h2")
LEASE = 30.0
ENGINE = "host:1:engine-0"

# Hypothesis' own default is 100 examples. A profile that asks for more (the
# conftest's "thorough", chosen with --hypothesis-profile) gets what it asks
# for; otherwise this suite stays quick.
_PROFILE_EXAMPLES = settings().max_examples
MAX_EXAMPLES = _PROFILE_EXAMPLES if _PROFILE_EXAMPLES > 100 else 50
STEPS = 30


def _cas_key(command: Command) -> tuple[str, int, str | None]:
    """What ``Move`` and ``TakeOver`` compare-and-set on."""
    return (command.state, command.attempt, command.owner)


def _wins(op: Operation, keys: dict[str, Any], used: set[int]) -> bool:
    """Whether ``op`` must commit, given the compare-and-set keys and used
    late replies so far in its batch (updated when it wins). A group wins if
    every one of its operations would, in order; else none of it counts."""
    if isinstance(op, Group):
        trial_keys, trial_used = dict(keys), set(used)
        if not all(_wins(inner, trial_keys, trial_used) for inner in op.operations):
            return False
        keys.update(trial_keys)
        used.update(trial_used)
        return True
    if isinstance(op, Insert):
        if _unstorable(op.command):
            return False  # SQLite cannot hold it: refused, as a duplicate is
        wins = op.command.id not in keys
        if wins:
            keys[op.command.id] = _cas_key(op.command)
        return wins
    if isinstance(op, Move):
        wins = keys.get(op.before.id) == _cas_key(op.before)
        if wins:
            keys[op.before.id] = _cas_key(op.after)
        return wins
    if isinstance(op, TakeOver):
        wins = keys.get(op.before.id) == _cas_key(op.before)
        if wins:
            keys[op.before.id] = (op.before.state, op.before.attempt, op.owner)
        return wins
    if isinstance(op, UseLateReply):
        wins = op.late_reply_id not in used
        used.add(op.late_reply_id)
        return wins
    return True


def _unstorable(command: Command) -> bool:
    """A lone surrogate anywhere (SQLite's text is UTF-8) or a priority past
    64 bits (its integer column); JSON text holds any integer."""
    if not -(2**63) <= command.priority < 2**63:
        return True
    text = json.dumps([command.request.to_json(), command.handler_args], ensure_ascii=False)
    try:
        text.encode()
    except UnicodeEncodeError:
        return True
    return False


@attrs.define
class LateModel:
    id: int
    command_id: str
    text: str
    used_by: str | None = None


class StoreMachine(RuleBasedStateMachine):
    KIND: Callable[[], StoreKind]  # the store implementation under test

    def __init__(self) -> None:
        super().__init__()
        self.kind = self.KIND()
        self.store = self.kind.new()
        self.clock = 1_700_000_000.0
        # The model: every command as the store must hold it, its journal as
        # (from, to, event), and the first terminal record of each.
        self.commands: dict[str, Command] = {}
        self.journal: dict[str, list[tuple[str | None, str, str]]] = {}
        self.terminal: dict[str, Command] = {}
        # The reply each command got from a legal sent->replied / resolve.
        self.replied_with: dict[str, Reply | None] = {}
        self.late: dict[int, LateModel] = {}
        self.replays: dict[str, list[str]] = {}  # dead id -> its replays, oldest first
        self.applied: list[Move | TakeOver] = []  # every move that won, for stale re-runs
        self.versions: list[Command] = []  # every record a command has had
        self.owners = [ENGINE]
        self.counter = 0

    def teardown(self) -> None:
        self.kind.close()

    # --- helpers -------------------------------------------------------------

    def tick(self) -> float:
        self.clock += 1.0
        return self.clock

    def lapsed(self, lease_until: float, now: float) -> bool:
        """Whether the store finds a lease run out at ``now``. A store on
        its own clock (a database server's) ignores ``now``: every lease
        granted here lasts ``LEASE`` from the server's now, far longer than
        an example runs, so only an ended one (``ReleaseLeases``: 0) has."""
        if self.kind.own_clock:
            return lease_until == 0
        return lease_until < now

    def fresh(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}-{self.counter}"

    def new_owner(self, host: int) -> str:
        """Another engine: every engine process names itself afresh."""
        owner = f"host:{host}:{self.fresh('engine')}"
        self.owners.append(owner)
        return owner

    def ids_in(self, *states: str) -> list[str]:
        return sorted(i for i, c in self.commands.items() if c.state in states)

    def new_command(self, data: st.DataObject, **fields: Any) -> Command:
        text = data.draw(st.text(max_size=20), label="text")
        return Command(
            id=new_id(),
            adapter=data.draw(st.sampled_from(ADAPTERS), label="adapter"),
            request=Request.from_json({"messages": [{"role": "user", "content": text}]}),
            state=PENDING,
            created_at=self.tick(),
            timeout=data.draw(st.sampled_from([1.0, 5.0, 30.0]), label="timeout"),
            max_attempts=data.draw(st.sampled_from([3, 1, 2]), label="max_attempts"),
            priority=data.draw(st.sampled_from([0, 10]), label="priority"),
            handler=data.draw(st.sampled_from(HANDLERS), label="handler"),
            handler_args=data.draw(
                st.none() | st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
                label="handler_args",
            ),
            expires_at=data.draw(st.none() | st.just(self.clock + 100.0), label="expires_at"),
            **fields,
        )

    def after(self, command: Command, event: str, **changes: Any) -> Move:
        """A legal move of ``command`` as the engine would make it."""
        now = self.tick()
        defaults: dict[str, Any]
        if event == DISPATCH:
            defaults = {
                "sent_at": now,
                "deadline": now + command.timeout,
                "not_before": None,
                "owner": ENGINE,
                "lease_until": now + LEASE,
            }
        elif event == REPLY:
            text = self.fresh("reply")
            defaults = {
                "reply": Reply(text, Usage(3, 1), raw={"n": self.counter}),
                "replied_at": now,
                "cost": 0.25,
            }
        elif event == RETRY:
            error = CommandError("RetryableError", "HTTP 503", 503)
            defaults = {
                "attempt": command.attempt + 1,
                "not_before": now + 2.0,
                "error": error,
                "owner": None,
                "lease_until": None,
            }
        elif event == FAIL and command.state == SENT:
            exhausted = command.attempt >= command.max_attempts
            defaults = {
                "reason": "retries_exhausted" if exhausted else "error",
                "error": CommandError("PermanentError", "HTTP 400", 400),
                "finished_at": now,
                "owner": None,
                "lease_until": None,
            }
        elif event == FAIL:  # replied: the handler raised
            defaults = {
                "reason": "handler_error",
                "error": CommandError("RuntimeError", "cannot apply"),
                "finished_at": now,
                "owner": None,
                "lease_until": None,
            }
        elif event == TIMEOUT:
            defaults = {"reason": "timeout", "finished_at": now, "owner": None, "lease_until": None}
        elif event == EXPIRE:
            defaults = {"reason": "expired", "finished_at": now}
        elif event == CANCEL:
            defaults = {
                "reason": "cancelled_by_user",
                "finished_at": now,
                "owner": None,
                "lease_until": None,
            }
        elif event == FINISH:
            defaults = {"finished_at": now, "owner": None, "lease_until": None}
        else:
            defaults = {}
        defaults.update(changes)
        new = attrs.evolve(command, state=next_state(command.state, event), **defaults)
        return Move(command, new, event, now, {"step": self.counter})

    def legal_events(self, command: Command) -> list[str]:
        """The events the engine would use from ``command``'s state
        (``resolve`` only comes with a late reply, in ``replay``)."""
        events = [e for e in COMMAND_TRANSITIONS[command.state] if e != RESOLVE]
        if command.state == SENT and command.attempt >= command.max_attempts:
            events.remove(RETRY)
        return events

    # --- committing against the model ----------------------------------------

    def commit(self, operations: Sequence[Operation]) -> list[Any]:
        """Commit ``operations`` in one batch and check each result against
        what the model says it must be; apply the winners to the model."""
        keys = {i: _cas_key(c) for i, c in self.commands.items()}
        used = {i for i, lr in self.late.items() if lr.used_by is not None}
        expected = [_wins(op, keys, used) for op in operations]

        results = self.store.commit(operations)

        assert len(results) == len(operations)
        for op, wins, result in zip(operations, expected, results, strict=True):
            if not wins:
                if isinstance(op, Insert):
                    assert isinstance(result, StoreError), (op, result)
                elif isinstance(op, Group):  # whatever its first loser raised
                    assert isinstance(result, IllegalTransition | StoreError), (op, result)
                else:  # a compare-and-set that found the row moved
                    assert isinstance(result, LostRace), (op, result)
                continue
            assert not isinstance(result, BaseException), (op, result)
            if isinstance(op, Group):
                for inner, inner_result in zip(op.operations, result, strict=True):
                    self.apply(inner, inner_result)
            else:
                self.apply(op, result)
        return results

    def apply(self, op: Operation, result: Any) -> None:
        """The model's side of an operation that won."""
        if isinstance(op, Insert):
            command = op.command
            assert isinstance(result, Event)
            assert (result.from_state, result.to_state, result.event) == (None, PENDING, "submit")
            self.commands[command.id] = command
            self.versions.append(command)
            self.journal[command.id] = [(None, PENDING, "submit")]
            self.replied_with[command.id] = None
        elif isinstance(op, Move):
            before, after = op.before, op.after
            assert isinstance(result, Event)
            assert (result.command_id, result.from_state, result.to_state, result.event) == (
                before.id,
                before.state,
                after.state,
                op.event,
            )
            assert before.state not in TERMINAL_STATES
            self.commands[after.id] = after
            self.versions.append(after)
            self.journal[after.id].append((before.state, after.state, op.event))
            if op.event in (REPLY, RESOLVE):
                self.replied_with[after.id] = after.reply
            if after.state in TERMINAL_STATES:
                self.terminal[after.id] = after
            self.applied.append(op)
        elif isinstance(op, TakeOver):
            # Journaled, as a note: the state is the same before and after.
            state = op.before.state
            assert isinstance(result, Event)
            assert (result.from_state, result.to_state, result.event) == (state, state, TAKE_OVER)
            assert result.detail == {"previous_owner": op.before.owner, "owner": op.owner}
            self.journal[op.before.id].append((state, state, TAKE_OVER))
            current = self.commands[op.before.id]
            self.commands[op.before.id] = attrs.evolve(
                current, owner=op.owner, lease_until=op.lease_until
            )
            self.versions.append(self.commands[op.before.id])
            self.applied.append(op)
        elif isinstance(op, AddLateReply):
            assert isinstance(result, int) and result not in self.late
            self.late[result] = LateModel(result, op.command_id, op.reply.text)
        elif isinstance(op, UseLateReply):
            self.late[op.late_reply_id].used_by = op.used_by
        elif isinstance(op, RenewLeases):
            held = set()
            for command_id, command in self.commands.items():
                if (
                    command_id in op.ids
                    and command.owner == op.owner
                    and command.state in (SENT, REPLIED)
                ):
                    self.commands[command_id] = attrs.evolve(command, lease_until=op.until)
                    held.add(command_id)
            assert result == held
        elif isinstance(op, ReleaseLeases):
            for command_id, command in self.commands.items():
                if command.owner == op.owner and command.state in (SENT, REPLIED):
                    self.commands[command_id] = attrs.evolve(command, lease_until=0.0)

    def move(self, command_id: str, event: str, **changes: Any) -> None:
        op = self.after(self.commands[command_id], event, **changes)
        [result] = self.commit([op])
        assert isinstance(result, Event)

    def outdated(self) -> list[Command]:
        """Records that are no longer what their command's compare-and-set
        would match: what a slower engine may still hold."""
        return [v for v in self.versions if _cas_key(v) != _cas_key(self.commands[v.id])]

    # --- rules: the life of a command ----------------------------------------

    @initialize(data=st.data())
    def some_commands(self, data: st.DataObject) -> None:
        for _ in range(data.draw(st.integers(0, 4), label="initial commands")):
            self.commit([Insert(self.new_command(data))])

    @rule(data=st.data())
    def submit(self, data: st.DataObject) -> None:
        command = self.new_command(data)
        self.commit([Insert(command, detail={"by": "test"})])

    @precondition(lambda self: self.ids_in(PENDING))
    @rule(data=st.data())
    def claim(self, data: st.DataObject) -> None:
        self.move(data.draw(st.sampled_from(self.ids_in(PENDING))), DISPATCH)

    @precondition(lambda self: self.commands)
    @rule(data=st.data())
    def deliver(self, data: st.DataObject) -> None:
        """As ``Engine.deliver``: a sent command takes the reply; any other
        state makes it a late reply, stored and not applied."""
        sent = self.ids_in(SENT)
        on_time = bool(sent) and data.draw(st.booleans(), label="on time")
        command_id = data.draw(st.sampled_from(sent if on_time else sorted(self.commands)))
        found = self.store.get(command_id)
        assert found == self.commands[command_id]
        if found.state == SENT:
            runnable = data.draw(st.booleans(), label="handler runnable here")
            owner_changes: dict[str, Any] = {} if runnable else {"owner": None, "lease_until": None}
            self.move(command_id, REPLY, **owner_changes)
        else:
            reply = Reply(self.fresh("late"), Usage(1, 1))
            [late_id] = self.commit([AddLateReply(command_id, reply, self.tick())])
            assert isinstance(late_id, int)

    @precondition(lambda self: self.ids_in(REPLIED))
    @rule(data=st.data())
    def finish(self, data: st.DataObject) -> None:
        self.move(data.draw(st.sampled_from(self.ids_in(REPLIED))), FINISH)

    @precondition(lambda self: self.ids_in(REPLIED))
    @rule(data=st.data())
    def handler_fails(self, data: st.DataObject) -> None:
        self.move(data.draw(st.sampled_from(self.ids_in(REPLIED))), FAIL)

    @precondition(lambda self: self.ids_in(SENT))
    @rule(data=st.data())
    def send_fails(self, data: st.DataObject) -> None:
        self.move(data.draw(st.sampled_from(self.ids_in(SENT))), FAIL)

    @precondition(lambda self: self.ids_in(SENT))
    @rule(data=st.data())
    def timeout(self, data: st.DataObject) -> None:
        self.move(data.draw(st.sampled_from(self.ids_in(SENT))), TIMEOUT)

    @precondition(
        lambda self: any(
            self.commands[i].attempt < self.commands[i].max_attempts for i in self.ids_in(SENT)
        )
    )
    @rule(data=st.data())
    def retry(self, data: st.DataObject) -> None:
        candidates = [
            i for i in self.ids_in(SENT) if self.commands[i].attempt < self.commands[i].max_attempts
        ]
        self.move(data.draw(st.sampled_from(candidates)), RETRY)

    @precondition(lambda self: self.ids_in(PENDING))
    @rule(data=st.data())
    def expire(self, data: st.DataObject) -> None:
        self.move(data.draw(st.sampled_from(self.ids_in(PENDING))), EXPIRE)

    @precondition(lambda self: self.ids_in(PENDING, SENT))
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        self.move(data.draw(st.sampled_from(self.ids_in(PENDING, SENT))), CANCEL)

    @precondition(lambda self: self.ids_in(SENT, REPLIED))
    @rule(data=st.data())
    def take_over(self, data: st.DataObject) -> None:
        """Another engine takes over work in flight (always a new owner, as
        every engine process names itself afresh)."""
        command = self.commands[data.draw(st.sampled_from(self.ids_in(SENT, REPLIED)))]
        owner = self.new_owner(2)
        at = self.tick()
        [result] = self.commit([TakeOver(command, owner, at + LEASE, at)])
        assert isinstance(result, Event) and result.at == at

    @rule(data=st.data())
    def leases(self, data: st.DataObject) -> None:
        owner = data.draw(st.sampled_from(self.owners), label="owner")
        if data.draw(st.booleans(), label="renew"):
            ids = data.draw(st.sets(st.sampled_from(sorted(self.commands) or ["none"])))
            at = self.tick()
            self.commit([RenewLeases(owner, at + LEASE, tuple(sorted(ids)), at)])
        else:
            self.commit([ReleaseLeases(owner)])

    def replay_group(self, dead: Command, late: LateReply | None) -> Group:
        """What ``Engine.replay`` commits for ``dead``: its new command, and
        with a late reply, resolved from it; all or nothing."""
        fresh = dead.replayed(new_id(), self.clock)
        operations: list[Operation] = [Insert(fresh, detail={"replay_of": dead.id})]
        if late is not None:
            resolve = self.after(
                fresh,
                RESOLVE,
                reply=late.reply,
                replied_at=self.clock,
                owner=ENGINE,
                lease_until=self.clock + LEASE,
            )
            operations += [resolve, UseLateReply(late.id, fresh.id)]
        return Group(tuple(operations))

    @precondition(lambda self: self.ids_in(DEAD))
    @rule(data=st.data())
    def replay(self, data: st.DataObject) -> None:
        """As ``Engine.replay``: a new pending command with ``replay_of``;
        with a stored late reply, resolved from it in the same batch."""
        dead = self.commands[data.draw(st.sampled_from(self.ids_in(DEAD)))]
        unused = self.store.late_replies(dead.id, unused_only=True)
        assert [r.id for r in unused] == sorted(
            i for i, lr in self.late.items() if lr.command_id == dead.id and lr.used_by is None
        )
        self.tick()
        use_late = bool(unused) and data.draw(st.booleans(), label="use late reply")
        late = unused[0] if use_late else None
        racing = use_late and data.draw(st.booleans(), label="a rival replays it too")
        groups = [self.replay_group(dead, late)]
        if racing:
            # Another engine's replay from the same read, in the same batch:
            # one of the two wins the late reply, and the other leaves nothing.
            groups.append(self.replay_group(dead, late))
            if data.draw(st.booleans(), label="the rival first"):
                groups.reverse()
        results = self.commit(groups)
        assert [isinstance(r, BaseException) for r in results] == [False] + [True] * racing
        winner = groups[0].operations[0]
        assert isinstance(winner, Insert)
        fresh = winner.command
        if racing:
            loser = groups[1].operations[0]
            assert isinstance(loser, Insert)
            assert self.store.find(loser.command.id) is None
        self.replays.setdefault(dead.id, []).append(fresh.id)
        if use_late:
            assert self.store.get(fresh.id).state == REPLIED
            used = {r.id: r.used_by for r in self.store.late_replies(dead.id)}
            assert used[unused[0].id] == fresh.id

    # --- rules: what must be refused ------------------------------------------

    @precondition(lambda self: self.applied)
    @rule(data=st.data())
    def stale_move(self, data: st.DataObject) -> None:
        """A transition (or takeover) from a ``before`` that is no longer
        current, as a slower engine would commit it: the very move that
        already won, committed again, or a new move from a record read
        before the command moved or was taken over. It raises and changes
        nothing."""
        op: Move | TakeOver
        if data.draw(st.booleans(), label="the same move again"):
            op = data.draw(st.sampled_from(self.applied))
        else:
            old = data.draw(st.sampled_from(self.outdated()))
            op = self.after(old, data.draw(st.sampled_from(self.legal_events(old))))
        current = self.commands[op.before.id]
        assert _cas_key(current) != _cas_key(op.before)
        [result] = self.commit([op])
        assert isinstance(result, LostRace)
        assert result.command_id == op.before.id
        assert result.state == current.state
        with pytest.raises(IllegalTransition):
            commit_one(self.store, op)

    @rule(data=st.data())
    def forbidden_move(self, data: st.DataObject) -> None:
        """Any (state, event) not in the table raises before anything is
        committed, whether or not a command is in that state."""
        existing = bool(self.commands) and data.draw(st.booleans(), label="existing command")
        if existing:
            command_id = data.draw(st.sampled_from(sorted(self.commands)))
            state = self.commands[command_id].state
        else:
            command_id, state = "c-" + str(self.counter), data.draw(st.sampled_from(COMMAND_STATES))
        forbidden = [
            e for e in (*COMMAND_EVENTS, "submit", "replay") if e not in COMMAND_TRANSITIONS[state]
        ]
        event = data.draw(st.sampled_from(forbidden))
        with pytest.raises(IllegalTransition) as caught:
            next_state(state, event, command_id=command_id)
        assert (caught.value.state, caught.value.event) == (state, event)
        assert caught.value.command_id == command_id
        assert command_id in str(caught.value)

    @precondition(lambda self: self.ids_in(PENDING, SENT, REPLIED))
    @rule(data=st.data())
    def batch(self, data: st.DataObject) -> None:
        """Several operations in one ``commit``: legal moves, new commands
        and late replies commit; the ones that lose their compare-and-set
        (the same move twice, a stale one, a duplicate insert, a late reply
        used twice) are reported and skipped, in whatever order they come."""
        movable = self.ids_in(PENDING, SENT, REPLIED)
        chosen = data.draw(
            st.lists(st.sampled_from(movable), min_size=1, max_size=4, unique=True),
            label="moved",
        )
        operations: list[Operation] = []
        firsts: list[Move] = []
        for command_id in chosen:
            command = self.commands[command_id]
            first = self.after(command, data.draw(st.sampled_from(self.legal_events(command))))
            firsts.append(first)
            operations.append(first)

        def again() -> Operation:
            # Another engine's move from the same read: one of the two loses.
            # Its result never has the same compare-and-set key as the first's
            # (another owner; not the same retry), so that a move chained to
            # the loser's result cannot win: no engine builds on a lost move.
            first = data.draw(st.sampled_from(firsts))
            events = self.legal_events(first.before)
            if first.event == RETRY:
                events.remove(RETRY)
            event = data.draw(st.sampled_from(events))
            if event not in (DISPATCH, REPLY):
                return self.after(first.before, event)
            rival = self.new_owner(3)
            return self.after(first.before, event, owner=rival, lease_until=self.clock + LEASE)

        def chained() -> Operation:
            # A move from another's result: it wins only if it comes after it.
            first = data.draw(st.sampled_from(firsts))
            if first.after.state in TERMINAL_STATES:
                return again()
            events = [e for e in COMMAND_TRANSITIONS[first.after.state] if e != RESOLVE]
            return self.after(first.after, data.draw(st.sampled_from(events)))

        def duplicate() -> Operation:
            existing = self.commands[data.draw(st.sampled_from(sorted(self.commands)))]
            return Insert(existing)

        def stale() -> Operation:
            outdated = self.outdated()
            if not outdated:
                return again()
            old = data.draw(st.sampled_from(outdated))
            return self.after(old, data.draw(st.sampled_from(self.legal_events(old))))

        def late_twice() -> Operation:
            used = [i for i, lr in self.late.items() if lr.used_by is not None]
            if not used:
                return again()
            return UseLateReply(data.draw(st.sampled_from(sorted(used))), "someone-else")

        def new_one() -> Operation:
            return Insert(self.new_command(data))

        def late_reply() -> Operation:
            target = data.draw(st.sampled_from(sorted(self.commands)))
            return AddLateReply(target, Reply(self.fresh("late")), self.tick())

        def unstorable() -> Operation:
            # What SQLite cannot hold, past the engine's checks: refused alone.
            unstorables: list[dict[str, Any]] = [{"priority": 2**64}, {"handler_args": ["\udc80"]}]
            bad = data.draw(st.sampled_from(unstorables), label="unstorable")
            return Insert(self.new_command(data).evolve(**bad))

        def group() -> Operation:
            # Operations that stand or fall together, a loser among them or not.
            inner = [data.draw(st.sampled_from(simple))() for _ in range(2)]
            return Group(tuple(inner))

        simple: list[Callable[[], Operation]] = [
            again,
            chained,
            duplicate,
            stale,
            late_twice,
            new_one,
            late_reply,
            unstorable,
        ]
        makers = [*simple, group]
        extra = data.draw(st.lists(st.sampled_from(makers), min_size=1, max_size=4), label="extra")
        operations += [make() for make in extra]
        order = data.draw(st.permutations(range(len(operations))), label="order")
        results = self.commit([operations[i] for i in order])
        assert any(not isinstance(r, BaseException) for r in results)

    @precondition(lambda self: self.commands)
    @rule(data=st.data())
    def reopen(self, data: st.DataObject) -> None:
        """Close the file and open it again, as a restarted process would
        (or first open a second connection, as another process would, and
        close the first while the second holds the file)."""
        if data.draw(st.booleans(), label="overlap"):
            other = self.kind.again(self.store)
            self.store.close()
            self.store = other
        else:
            self.store.close()
            self.store = self.kind.reopen(self.store)

    @rule(data=st.data())
    def reads(self, data: st.DataObject) -> None:
        """The engine's own queries agree with the model."""
        now = self.clock + data.draw(st.sampled_from([-50.0, 0.0, 5.0, 100.0]), label="dt")
        adapter = data.draw(st.sampled_from(ADAPTERS), label="adapter")
        handlers = data.draw(st.none() | st.lists(st.sampled_from(["h1", "h2"])), label="handlers")
        limit = data.draw(st.integers(1, 5), label="limit")
        ready = [
            c
            for c in self.commands.values()
            if c.state == PENDING
            and c.adapter == adapter
            and (c.not_before is None or c.not_before <= now)
            and (handlers is None or c.handler is None or c.handler in handlers)
        ]
        ready.sort(key=lambda c: (-c.priority, c.id))
        assert self.store.ready_to_send(adapter, now, limit, handlers) == ready[:limit]

        me = data.draw(st.sampled_from(self.owners), label="me")
        gone = set(data.draw(st.lists(st.sampled_from(self.owners)), label="gone"))
        abandoned = sorted(
            (
                c
                for c in self.commands.values()
                if c.state in (SENT, REPLIED)
                and (
                    c.lease_until is None
                    or self.lapsed(c.lease_until, now)
                    or (c.owner is not None and c.owner != me and c.owner in gone)
                )
            ),
            key=lambda c: c.id,
        )
        assert self.store.abandoned(me, now, gone.__contains__) == abandoned

        assert sorted(self.store.timed_pending()) == sorted(
            (c.id, c.expires_at, c.not_before)
            for c in self.commands.values()
            if c.state == PENDING and (c.expires_at is not None or c.not_before is not None)
        )
        states = data.draw(st.lists(st.sampled_from(COMMAND_STATES), unique=True), label="states")
        assert [c.id for c in self.store.list(states, newest_first=True)] == sorted(
            (i for i, c in self.commands.items() if c.state in states), reverse=True
        )

    # --- invariants -----------------------------------------------------------

    @invariant()
    def no_command_is_lost(self) -> None:
        stored = {c.id: c for c in self.store.list()}
        assert stored.keys() == self.commands.keys()
        assert len(stored) == len(self.commands)
        for command_id, command in self.commands.items():
            assert stored[command_id] == command
            assert self.store.get(command_id) == command
        counts: dict[tuple[str, str], int] = {}
        for command in self.commands.values():
            key = (command.adapter, command.state)
            counts[key] = counts.get(key, 0) + 1
        assert self.store.counts() == counts

    @invariant()
    def journal_replays_to_the_current_state(self) -> None:
        total = 0
        for command_id, command in self.commands.items():
            history = self.store.history(command_id)
            total += len(history)
            assert [(e.from_state, e.to_state, e.event) for e in history] == self.journal[
                command_id
            ]
            state: str | None = None
            for event in history:
                assert event.command_id == command_id
                assert event.from_state == state
                if state is None:
                    assert (event.event, event.to_state) == ("submit", PENDING)
                elif event.event == TAKE_OVER:  # not a transition: the state stays
                    assert event.to_state == state
                else:
                    assert next_state(state, event.event) == event.to_state
                state = event.to_state
            assert state == command.state
            seqs = [e.seq for e in history]
            assert seqs == sorted(set(seqs))
        # No journal row without its transition (a lost race journals nothing).
        assert self.kind.journal_rows(self.store) == total

    @invariant()
    def terminal_states_never_change(self) -> None:
        for command_id, snapshot in self.terminal.items():
            assert self.store.get(command_id) == snapshot

    @invariant()
    def late_replies_are_never_applied(self) -> None:
        for command_id, command in self.commands.items():
            assert command.reply == self.replied_with[command_id]
            assert self.store.get(command_id).reply == self.replied_with[command_id]
            events = [e for _, _, e in self.journal[command_id]]
            if command.reply is not None:
                assert REPLY in events or RESOLVE in events
            if command.reply is not None and command.reply.text.startswith("late-"):
                # Only a replay resolved from a late reply carries one.
                assert RESOLVE in events and command.replay_of is not None
                [used] = [lr for lr in self.late.values() if lr.text == command.reply.text]
                assert used.used_by == command_id and used.command_id == command.replay_of
        for command_id in {lr.command_id for lr in self.late.values()} | set(self.commands):
            stored = self.store.late_replies(command_id)
            model = sorted(
                (lr for lr in self.late.values() if lr.command_id == command_id),
                key=lambda lr: lr.id,
            )
            assert [(r.id, r.reply.text, r.used_by) for r in stored] == [
                (lr.id, lr.text, lr.used_by) for lr in model
            ]

    @invariant()
    def dead_letters_are_exactly_the_dead(self) -> None:
        letters = self.store.dead_letters(include_replayed=True)
        dead = self.ids_in(DEAD)
        assert [c.id for c, _, _ in letters] == dead
        for command, replayed_by, unused in letters:
            assert command == self.commands[command.id]
            replays = self.replays.get(command.id, [])
            assert replayed_by == (replays[-1] if replays else None)
            assert unused == sum(
                1 for lr in self.late.values() if lr.command_id == command.id and lr.used_by is None
            )
        waiting = self.store.dead_letters()
        assert [c.id for c, _, _ in waiting] == [i for i in dead if i not in self.replays]


# One machine per store implementation (tests/stores.py).
for _name, _kind in STORES.items():
    _machine: type[StoreMachine] = type(
        f"StoreMachine_{_name}", (StoreMachine,), {"KIND": staticmethod(_kind)}
    )
    # A server store costs a database per example and a round trip per
    # read: half the examples keep its run to seconds (the thorough profile
    # asks for the full count).
    examples = MAX_EXAMPLES if _name == "sqlite" or _PROFILE_EXAMPLES > 100 else MAX_EXAMPLES // 2
    _machine.TestCase.settings = settings(max_examples=examples, stateful_step_count=STEPS)
    globals()[f"TestStoreMachine_{_name}"] = _machine.TestCase


# --- the store's own guard ---------------------------------------------------


def _stored(store: StoreProtocol, state: str) -> Command:
    command = Command(
        id=new_id(),
        adapter="scripted",
        request=Request.from_json({"messages": [{"role": "user", "content": "hi"}]}),
        state=PENDING,
        created_at=1.0,
        timeout=5.0,
    )
    commit_one(store, Insert(command))
    path = {
        PENDING: [],
        DEAD: [(EXPIRE, DEAD)],
        "cancelled": [(CANCEL, "cancelled")],
        "done": [(DISPATCH, SENT), (REPLY, REPLIED), (FINISH, "done")],
    }[state]
    for event, target in path:
        moved = attrs.evolve(command, state=target)
        commit_one(store, Move(command, moved, event, 2.0))
        command = moved
    return command


@pytest.mark.parametrize("state", ["done", DEAD, "cancelled"])
def test_store_refuses_to_move_a_terminal_command(make_store: MakeStore, state: str) -> None:
    store = make_store()
    try:
        command = _stored(store, state)
        revived = attrs.evolve(command, state=PENDING, reason=None, finished_at=None)
        [result] = store.commit([Move(command, revived, RETRY, 3.0)])
        assert store.get(command.id) == command
        assert [e.to_state for e in store.history(command.id)][-1] == state
        assert isinstance(result, IllegalTransition)
    finally:
        store.close()


def test_store_refuses_a_move_whose_event_does_not_lead_to_its_state(
    make_store: MakeStore,
) -> None:
    store = make_store()
    try:
        command = _stored(store, PENDING)
        wrong = attrs.evolve(command, state="done", finished_at=2.0)  # pending --dispatch--> done
        [result] = store.commit([Move(command, wrong, DISPATCH, 2.0)])
        assert store.get(command.id) == command
        assert isinstance(result, IllegalTransition)
    finally:
        store.close()
