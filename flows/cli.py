"""The ``dovecote`` command: the face of the house.

Tables for people by default, ``--json`` for scripts. Commands that only
look (``pending``, ``dead``, ``show``, ``stats``, ``export``) open the store
and nothing else; commands that act (``demo``, ``replay``, ``serve``) run an
engine. The database is ``--db``, else ``$DOVECOTE_DB``, else
``./.dovecote/dovecote.db``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, Final

import attrs
import trio

from adapters import config
from adapters.base import Adapter
from adapters.human import HumanAdapter
from adapters.scripted import ScriptedAdapter
from flows import budget
from flows.checks import UnknownCheck
from flows.engine import default_db_path, open_engine
from flows.errors import IllegalTransition, StoreError, UnknownCommand
from flows.location import location, open_store
from flows.render import COMMAND_HEADERS, command_rows, show, table
from flows.runtime import UnknownFlow
from flows.states import PENDING, REPLIED, SENT, TERMINAL_STATES
from flows.storage import StoreProtocol


def _print_json(value: Any) -> None:
    print(json.dumps(value, ensure_ascii=False, indent=2))


def _open_store(args: argparse.Namespace) -> StoreProtocol:
    """The database, read-only: for the commands that only look."""
    return open_store(args.db, "read")


def _adapters(args: argparse.Namespace) -> list[Adapter]:
    """Providers from ``dovecote.toml`` (none when there is no file); the
    engine's own kinds (scripted, human) are built here under their names."""
    found = config.load_config(args.config)
    adapters: list[Adapter] = list(config.build_adapters(found))
    for provider in found.providers:
        own: Adapter
        if provider.kind == "scripted":
            own = ScriptedAdapter(
                provider.name,
                max_in_flight=provider.settings.max_in_flight,
                on_interrupt=provider.settings.on_interrupt,
            )
        elif provider.kind == "human":
            own = HumanAdapter(provider.name, timeout=provider.settings.timeout)
        else:
            continue
        own.settings = attrs.evolve(
            own.settings,
            price=provider.settings.price,
            cache=provider.settings.cache,
            cache_ttl=provider.settings.cache_ttl,
            budget_per_day=provider.settings.budget_per_day,
        )
        adapters.append(own)
    return adapters


def cmd_adapters(args: argparse.Namespace) -> int:
    """What is configured, and whether each key's variable is set."""
    found = config.load_config(args.config)
    statuses = config.key_status(found)
    rows: list[dict[str, Any]] = [
        {
            "name": s.name,
            "kind": s.kind,
            "api_key_env": s.api_key_env,
            "key_set": s.is_set if s.api_key_env else None,
        }
        for s in statuses
    ]
    builtin = [
        {"name": n, "kind": n, "api_key_env": None, "key_set": None} for n in ("scripted", "human")
    ]
    rows = builtin + [r for r in rows if r["name"] not in ("scripted", "human")]
    if args.json:
        _print_json({"config": str(found.path) if found.path else None, "adapters": rows})
        return 0
    print(f"config: {found.path or 'none found (embedded adapters only)'}")
    print(
        table(
            ("adapter", "kind", "key variable", "key"),
            [
                [
                    r["name"],
                    r["kind"],
                    r["api_key_env"] or "-",
                    "-" if r["key_set"] is None else ("set" if r["key_set"] else "NOT SET"),
                ]
                for r in rows
            ],
        )
    )
    return 0


def duration(text: str) -> float:
    """``90``, ``90s``, ``15m``, ``12h``, ``30d`` -> seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if match is None:
        raise argparse.ArgumentTypeError(f"expected a duration like 90s, 15m, 12h or 30d: {text!r}")
    scale = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]
    return float(match.group(1)) * scale


def positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number from 1 up, got {value}")
    return value


# --- commands that look ------------------------------------------------------


def cmd_pending(args: argparse.Namespace) -> int:
    with _closing(_open_store(args)) as store:
        commands = store.list([PENDING, SENT, REPLIED], limit=args.limit)
        if args.json:
            _print_json([c.to_json() for c in commands])
        elif not commands:
            print("nothing pending")
        else:
            print(table(COMMAND_HEADERS, command_rows(commands, time.time())))
    return 0


def cmd_dead(args: argparse.Namespace) -> int:
    with _closing(_open_store(args)) as store:
        letters = store.dead_letters(
            reason=args.reason,
            adapter=args.adapter,
            limit=args.limit,
            include_replayed=args.all,
        )
        if args.json:
            _print_json(
                [
                    {**c.to_json(), "replayed_by": by, "unused_late_replies": late}
                    for c, by, late in letters
                ]
            )
            return 0
        if not letters:
            print("no dead letters" + ("" if args.all else " waiting for a decision"))
            return 0
        now = time.time()
        rows = []
        for (_, replayed_by, late), row in zip(
            letters, command_rows([c for c, _, _ in letters], now), strict=True
        ):
            row.insert(-1, replayed_by or ("late reply" if late else ""))
            rows.append(row)
        headers = (*COMMAND_HEADERS[:-1], "replayed by / note", COMMAND_HEADERS[-1])
        print(table(headers, rows))
        print(
            f"\n{len(letters)} dead letter(s). "
            "Replay with: dovecote replay ID... | --reason R | --all"
        )
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    with _closing(_open_store(args)) as store:
        command = store.get(args.id)
        events = store.history(command.id)
        if args.json:
            _print_json(
                {
                    "command": command.to_json(),
                    "events": [e.to_json() for e in events],
                    "late_replies": [
                        {
                            "id": r.id,
                            "reply": r.reply.to_json(),
                            "received_at": r.received_at,
                            "used_by": r.used_by,
                        }
                        for r in store.late_replies(command.id)
                    ],
                }
            )
        else:
            print(show(command, events))
            for late in store.late_replies(command.id):
                used = f", used by {late.used_by}" if late.used_by else ""
                print(f"\nlate reply #{late.id}{used}: {late.reply.text}")
    return 0


def _configured(args: argparse.Namespace) -> tuple[config.ProviderConfig, ...]:
    """The configured adapters, for a command that only looks: a file it
    cannot read (another user's home) costs it the adapters' budgets, said
    on stderr, not the rest of its answer."""
    try:
        return config.load_config(args.config).providers
    except config.ConfigError as exc:
        print(f"dovecote: adapter budgets not shown: {exc}", file=sys.stderr)
        return ()


def cmd_stats(args: argparse.Namespace) -> int:
    with _closing(_open_store(args)) as store:
        counts = store.counts()
        usage = {by: store.usage_totals(by) for by in ("adapter", "flow", "day")}
        today = budget.day_start(time.time())
        budgets = {
            "adapters": [
                {
                    "adapter": p.name,
                    "budget_per_day": p.settings.budget_per_day,
                    "spent_today": store.spent(p.name, today),
                }
                for p in _configured(args)
                if p.settings.budget_per_day is not None
            ],
            "flows": store.flow_budgets(),
        }
        if args.json:
            _print_json(
                {
                    "states": [
                        {"adapter": a, "state": s, "count": n}
                        for (a, s), n in sorted(counts.items())
                    ],
                    "usage": usage,
                    "budgets": budgets,
                }
            )
            return 0
        adapters = sorted({a for a, _ in counts})
        states = ("pending", "sent", "replied", "done", "dead", "cancelled")
        print(
            table(
                ("adapter", *states, "total"),
                [
                    [
                        a,
                        *(counts.get((a, s), 0) for s in states),
                        sum(counts.get((a, s), 0) for s in states),
                    ]
                    for a in adapters
                ],
            )
        )
        for by, rows in usage.items():
            print(f"\nby {by}")
            print(
                table(
                    (by, "calls", "done", "dead", "input tokens", "output tokens", "cost $"),
                    [
                        [
                            r["key"] or "-",
                            r["calls"],
                            r["done"],
                            r["dead"],
                            r["input_tokens"],
                            r["output_tokens"],
                            f"{r['cost']:.4f}",
                        ]
                        for r in rows
                    ],
                )
            )
        spend = [
            [
                "adapter " + r["adapter"] + " today",
                f"{r['spent_today']:.4f} / {r['budget_per_day']:.4f}",
            ]
            for r in budgets["adapters"]
        ] + [
            [f"flow {r['flow']} ({r['name']})", f"{r['spent']:.4f} / {r['budget']:.4f}"]
            for r in budgets["flows"]
        ]
        if spend:
            print("\nspend against budget")
            print(table(("budget of", "spent / budget"), spend))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """One JSON object per line: by default each command with its journal;
    ``--format chat | preference`` the data set shapes of flows.datasets."""
    from flows import datasets

    with _closing(_open_store(args)) as store:
        after = datasets.since(args.since) if args.since else None
        states = args.state or (["done"] if args.format != "commands" else None)
        flow_ids: list[str | None] = [None]
        if args.flow:
            flow_ids = [f.id for f in store.flows() if args.flow in (f.id, f.name)]
        for flow_id in flow_ids:
            for command in store.list(states, adapter=args.adapter, flow_id=flow_id, since=after):
                line: dict[str, Any] | None
                if args.format == "chat":
                    line = datasets.chat_line(command)
                elif args.format == "preference":
                    line = datasets.preference_line(command, store.history(command.id))
                else:
                    line = command.to_json()
                    line["events"] = [e.to_json() for e in store.history(command.id)]
                if line is not None:
                    print(json.dumps(line, ensure_ascii=False))
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    """``cache stats`` looks (a read-only file will do); ``cache clear``
    forgets entries, never the commands they point to."""
    if args.action == "clear":
        older = None if args.older_than is None else time.time() - args.older_than
        with _closing(open_store(args.db, "existing")) as store:
            count = store.clear_cache(args.adapter, older)
        if args.json:
            _print_json({"cleared": count})
        else:
            print(f"cleared {count} cache entr{'y' if count == 1 else 'ies'}")
        return 0
    with _closing(_open_store(args)) as store:
        rows = store.cache_stats()
    if args.json:
        _print_json({"adapters": rows})
        return 0
    print(
        table(
            ("adapter", "entries", "served", "hits", "bytes", "oldest"),
            [
                [
                    r["adapter"],
                    r["entries"],
                    r["served"],
                    r["hits"],
                    r["bytes"],
                    time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(r["oldest"])),
                ]
                for r in rows
            ],
        )
    )
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    with _closing(open_store(args.db, "existing")) as store:
        count = store.prune(time.time() - args.older_than)
    if args.json:
        _print_json({"deleted": count})
    else:
        print(f"deleted {count} finished command(s) older than {args.older_than:g} s")
    return 0


# --- commands that act -------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    from editor_bridge.demo import editing_session
    from flows.demo import run_demo

    return trio.run(
        partial(run_demo, args.db, args.adapter, _adapters(args), epilogue=editing_session)
    )


def cmd_replay(args: argparse.Namespace) -> int:
    if not args.ids and not args.reason and not args.all:
        raise UsageError("say what to replay: IDs, --reason R or --all")
    if args.ids and (args.reason or args.all):
        raise UsageError("give either IDs or a filter (--reason / --all), not both")
    return trio.run(_replay, args, _adapters(args))


async def _replay(args: argparse.Namespace, adapters: list[Adapter]) -> int:
    async with open_engine(args.db, adapters=adapters) as engine:
        if args.ids:
            ids = list(args.ids)
        else:
            letters = engine.store.dead_letters(reason=args.reason, adapter=args.adapter)
            ids = [c.id for c, _, _ in letters]
        if not ids:
            print("no dead letters to replay")
            return 0
        new_ids = await engine.replay(ids, timeout=args.timeout, use_late_reply=args.use_late_reply)
        if not args.no_wait:
            print(f"replaying {len(new_ids)} command(s)...", file=sys.stderr)
            for command_id in new_ids:
                if engine.can_serve(engine.get(command_id)):
                    await engine.wait(command_id)
        final = [engine.get(i) for i in new_ids]
        if args.json:
            _print_json(
                [{"from": old, "to": new.to_json()} for old, new in zip(ids, final, strict=True)]
            )
        else:
            print(
                table(
                    ("dead letter", "replayed as", "state", "reason"),
                    [
                        [old, new.id, new.state, new.reason or ""]
                        for old, new in zip(ids, final, strict=True)
                    ],
                )
            )
            queued = [c for c in final if c.state not in TERMINAL_STATES]
            if queued:
                print(f"\n{len(queued)} left queued for an engine that can serve them.")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """The JSON-RPC bridge for editors (the one place the CLI imports it)."""
    import logging

    from editor_bridge.serve import ListenError, serve

    if not args.stdio and not args.listen:
        raise UsageError("say where to serve: --stdio, or --listen unix:PATH / tcp:127.0.0.1:PORT")
    # stdout may carry the protocol: everything a person should read goes to stderr.
    logging.basicConfig(stream=sys.stderr, level=logging.INFO if args.verbose else logging.WARNING)
    try:
        trio.run(
            partial(
                serve,
                args.db,
                stdio=args.stdio,
                listen=args.listen or (),
                allow_remote=args.allow_remote,
                adapters=_adapters(args),
                max_frame=args.max_frame,
                max_outbox=args.max_outbox,
                final_idle=args.final_idle,
            )
        )
    except ListenError as exc:
        print(f"dovecote serve: {exc}", file=sys.stderr)
        return 2
    return 0


EVAL_HEADERS: Final = (
    *("adapter", "items", "passed", "pass rate", "cost $"),
    *("p50 s", "p95 s", "retries", "dead"),
)


def cmd_eval(args: argparse.Namespace) -> int:
    """Run a data set on each adapter, judge each reply, a table per adapter."""
    from flows import evaluate

    items, digest = evaluate.load_dataset(Path(args.dataset))
    adapters = list(dict.fromkeys(args.adapter))
    key = evaluate.run_key(digest, adapters, args.check)
    return trio.run(_eval, args, items, adapters, key, _adapters(args))


async def _eval(
    args: argparse.Namespace, items: list[Any], names: list[str], key: str, adapters: list[Adapter]
) -> int:
    from flows import evaluate

    async with open_engine(args.db, adapters=adapters) as engine:
        for name in names:
            if name not in engine.adapters:
                known = ", ".join(sorted(engine.adapters))
                raise ValueError(f"no adapter {name!r} (known: {known})")
        outcomes = await evaluate.evaluate(engine, items, names, args.check, key, args.concurrency)
    rows = evaluate.summary(outcomes, names)
    if args.json:
        _print_json(
            {
                "run": key,
                "check": args.check,
                "adapters": rows,
                "items": [
                    {
                        "adapter": o.adapter,
                        "line": o.item.line,
                        "command_id": o.command.id if o.command else None,
                        "state": o.command.state if o.command else None,
                        "reply": o.command.reply.text if o.command and o.command.reply else None,
                        "expected": o.item.expected,
                        "score": o.score.to_json() if o.score else None,
                    }
                    for o in outcomes
                ],
            }
        )
        return 0

    def seconds(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    print(f"eval run {key} (check {args.check})")
    print(
        table(
            EVAL_HEADERS,
            [
                [
                    r["adapter"],
                    r["items"],
                    r["passed"],
                    f"{r['pass_rate']:.0%}",
                    f"{r['cost']:.4f}",
                    seconds(r["p50_latency"]),
                    seconds(r["p95_latency"]),
                    r["retries"],
                    r["dead"],
                ]
                for r in rows
            ],
        )
    )
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from flows import flowcli

    return trio.run(flowcli.run_file, args, _adapters(args))


def cmd_flow(args: argparse.Namespace) -> int:
    from flows import flowcli

    if args.action == "list":
        return flowcli.listing(args)
    if args.action == "show":
        return flowcli.show(args)
    if args.action == "graph":
        return flowcli.graph(args)
    act = {"retry": flowcli.retry, "fork": flowcli.fork, "cancel": flowcli.cancel}[args.action]
    return trio.run(act, args, _adapters(args))


# --- plumbing ----------------------------------------------------------------


class UsageError(Exception):
    pass


class _closing:
    def __init__(self, store: StoreProtocol) -> None:
        self.store = store

    def __enter__(self) -> StoreProtocol:
        return self.store

    def __exit__(self, *exc: object) -> None:
        self.store.close()


def _common_options(defaults: bool) -> argparse.ArgumentParser:
    """--db, --config and --json, accepted before and after the command. The
    command's copy has no defaults of its own (SUPPRESS), or it would undo
    what was given before the command."""
    common = argparse.ArgumentParser(add_help=False)
    unset = None if defaults else argparse.SUPPRESS
    common.add_argument(
        "--db",
        type=location,
        default=unset,
        help="database file or postgresql:// URL (default: $DOVECOTE_DB or "
        "./.dovecote/dovecote.db)",
    )
    common.add_argument("--config", default=unset, help="dovecote.toml with provider settings")
    common.add_argument(
        "--json",
        action="store_true",
        default=False if defaults else argparse.SUPPRESS,
        help="print JSON for scripts",
    )
    return common


def build_parser() -> argparse.ArgumentParser:
    common = _common_options(defaults=False)
    parser = argparse.ArgumentParser(
        prog="dovecote",
        description="Durable, replayable LLM calls: a pending table, dead letters and replay.",
        parents=[_common_options(defaults=True)],
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(
        name: str, run: Callable[[argparse.Namespace], int], help: str
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=[common], help=help, description=help)
        p.set_defaults(run=run)
        return p

    p = add(
        "demo", cmd_demo, "run a batch of calls through their whole life on the embedded default"
    )
    p.add_argument("--adapter", default="scripted", help="adapter to call (default: scripted)")

    p = add("serve", cmd_serve, "serve editors over JSON-RPC (LSP framing)")
    p.add_argument("--stdio", action="store_true", help="speak on stdin/stdout (no token)")
    p.add_argument(
        "--listen",
        action="append",
        metavar="ADDR",
        help="unix:PATH (mode 0600) or tcp:127.0.0.1:PORT; needs the token file's token",
    )
    p.add_argument(
        "--allow-remote", action="store_true", help="allow --listen on a non-loopback address"
    )
    p.add_argument(
        "--max-frame",
        type=int,
        default=16 * 1024 * 1024,
        metavar="BYTES",
        help="refuse frames larger than this (default 16 MiB)",
    )
    p.add_argument(
        "--max-outbox",
        type=int,
        default=64 * 1024 * 1024,
        metavar="BYTES",
        help="disconnect a client that leaves more than this unread (default 64 MiB)",
    )
    p.add_argument(
        "--final-idle",
        type=positive_seconds,
        default=60.0,
        metavar="SECONDS",
        help="a corrected region left alone this long holds its final text (default 60)",
    )
    p.add_argument("--verbose", action="store_true", help="log to stderr")

    add("adapters", cmd_adapters, "list configured adapters and whether their keys are set")

    p = add("pending", cmd_pending, "list commands not yet finished (pending, sent, replied)")
    p.add_argument("--limit", type=int, default=None)

    p = add("dead", cmd_dead, "list dead letters waiting for a decision")
    p.add_argument("--reason", default=None, help="only this reason (timeout, error, ...)")
    p.add_argument("--adapter", default=None, help="only this adapter")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--all", action="store_true", help="include those already replayed")

    p = add("replay", cmd_replay, "replay dead letters as new commands")
    p.add_argument("ids", nargs="*", metavar="ID")
    p.add_argument(
        "--reason", default=None, help="replay every unreplayed dead letter with this reason"
    )
    p.add_argument("--adapter", default=None, help="with --reason/--all: only this adapter")
    p.add_argument("--all", action="store_true", help="replay every unreplayed dead letter")
    p.add_argument("--timeout", type=positive_seconds, default=None, help="new timeout in seconds")
    p.add_argument(
        "--use-late-reply",
        action="store_true",
        help="resolve from a stored late reply instead of calling the model again",
    )
    p.add_argument("--no-wait", action="store_true", help="queue the replays and return")

    p = add("show", cmd_show, "one command and its journal")
    p.add_argument("id")

    p = add("run", cmd_run, "run a flow defined in a Python file, a line per step")
    p.add_argument("file", metavar="FILE")
    p.add_argument("--flow", default=None, help="which flow, when FILE defines several")
    p.add_argument("--param", action="append", metavar="K=V", help="a parameter (JSON or text)")
    p.add_argument("--adapter", default=None, help="pass adapter=NAME to the flow")

    p = add("flow", cmd_flow, "list, show, retry, cancel, fork or draw flows")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    a = actions.add_parser("list", parents=[common], help="flows and their states")
    a.add_argument("--state", action="append", help="only these states (repeatable)")
    a = actions.add_parser("show", parents=[common], help="a flow, its steps and its path")
    a.add_argument("id")
    a = actions.add_parser("retry", parents=[common], help="replay a stalled flow's dead step")
    a.add_argument("id")
    a.add_argument("--file", default=None, help="the file defining the flow, to run it on")
    a.add_argument("--timeout", type=positive_seconds, default=None)
    a = actions.add_parser("cancel", parents=[common], help="cancel a flow and its calls")
    a.add_argument("id")
    a = actions.add_parser("fork", parents=[common], help="a new flow reusing steps before N")
    a.add_argument("id")
    a.add_argument("--from-step", type=int, required=True, metavar="N")
    a.add_argument("--file", default=None, help="the file defining the flow")
    a = actions.add_parser("graph", parents=[common], help="a declared flow as DOT and Mermaid")
    a.add_argument("name")
    a.add_argument("--file", default=None, help="the file defining the flow")

    add(
        "stats",
        cmd_stats,
        "counts by state; tokens and cost by adapter, flow and day; spend against budgets",
    )

    p = add("export", cmd_export, "every command with its journal, one JSON object a line")
    p.add_argument(
        "--format",
        choices=("commands", "chat", "preference"),
        default="commands",
        help="commands (default: each command and its journal); chat (messages then the "
        "reply, for fine-tuning); preference (prompt/chosen/rejected from editor corrections)",
    )
    p.add_argument(
        "--state", action="append", help="only these states (repeatable; chat/preference: done)"
    )
    p.add_argument("--since", default=None, help="only calls made since: 7d, 12h, an ISO date")
    p.add_argument("--adapter", default=None, help="only this adapter's calls")
    p.add_argument("--flow", default=None, help="only this flow's calls (its id or its name)")

    p = add("eval", cmd_eval, "run a JSONL data set on adapters and judge each reply by a check")
    p.add_argument("dataset", metavar="DATASET.jsonl")
    p.add_argument(
        "--adapter", action="append", required=True, help="an adapter to evaluate (repeatable)"
    )
    p.add_argument("--check", required=True, help="the registered check that judges a reply")
    p.add_argument(
        "--concurrency", type=positive_int, default=8, help="items called at once (default 8)"
    )

    p = add("cache", cmd_cache, "the response cache: stats, or clear entries")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    actions.add_parser("stats", parents=[common], help="entries, hits and bytes by adapter")
    a = actions.add_parser("clear", parents=[common], help="forget entries (the calls stay)")
    a.add_argument("--adapter", default=None, help="only this adapter's entries")
    a.add_argument("--older-than", type=duration, default=None, help="only older ones: 30d, 12h")

    p = add("prune", cmd_prune, "delete finished commands older than an age")
    p.add_argument("--older-than", type=duration, required=True, help="e.g. 30d, 12h")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.db is None:
        args.db = default_db_path()
    try:
        return int(args.run(args))
    except UsageError as exc:
        parser.error(str(exc))
    except USER_ERRORS as exc:
        print(f"dovecote: {exc}", file=sys.stderr)
        return 1
    except BaseExceptionGroup as group:
        # An error raised inside an engine's nursery arrives wrapped.
        mistake = _first(group)
        if mistake is None:
            raise
        print(f"dovecote: {mistake}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


USER_ERRORS = (
    UnknownCommand,
    UnknownFlow,
    IllegalTransition,
    StoreError,
    config.ConfigError,
    UnknownCheck,
    ValueError,
    OSError,  # a file dovecote may not read or write: one line, not a traceback
)


def _first(group: BaseExceptionGroup[BaseException]) -> BaseException | None:
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            found = _first(exc)
            if found is not None:
                return found
        elif isinstance(exc, USER_ERRORS):
            return exc
    return None


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
