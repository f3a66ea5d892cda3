"""The scripted adapter: a deterministic model that needs no network and no key.

It is the embedded default, so ``make demo``, the tests and the editor
clients' tests run anywhere. Its behaviour is steered by directive lines at
the start of the last user message, one per line:

    #delay S        reply after S seconds (float)
    #hang           never reply (for timeout tests)
    #fail CODE      fail as an HTTP status CODE would (429/5xx retryable)
    #fail-times N   fail the first N attempts with 503, then answer
    #reply          the reply is the rest of the message after this line
    #replies        one reply per line of the rest of the message: the Nth
                    answers the conversation's Nth turn (the last line once
                    they run out); in the FIRST user message it steers the
                    whole conversation, so later user turns (a typed call's
                    re-asks) need no directives of their own

Directive lines are not part of the text. Without ``#reply`` the reply is the
remaining text with common English misspellings corrected (``teh`` -> ``the``),
whole words only, case-insensitively, keeping the case of the first letter;
every other character, line ends included, is kept. That makes the
corrections flow work offline.

``#fail-times`` counts by the command's attempt number, not by calls this
process has seen, so it gives the same answers after a restart.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from pathlib import Path

import attrs
import trio

from adapters.base import (
    AdapterError,
    AdapterSettings,
    Answer,
    PermanentError,
    Reply,
    Request,
    RetryableError,
    SendContext,
    Usage,
    error_for_status,
)

MISSPELLINGS: dict[str, str] = {
    "teh": "the",
    "recieve": "receive",
    "recieved": "received",
    "beleive": "believe",
    "acheive": "achieve",
    "adress": "address",
    "accomodate": "accommodate",
    "agressive": "aggressive",
    "apparantly": "apparently",
    "begining": "beginning",
    "beleif": "belief",
    "calender": "calendar",
    "definately": "definitely",
    "dissapoint": "disappoint",
    "embarass": "embarrass",
    "enviroment": "environment",
    "existance": "existence",
    "familar": "familiar",
    "finaly": "finally",
    "foriegn": "foreign",
    "freind": "friend",
    "goverment": "government",
    "grammer": "grammar",
    "happend": "happened",
    "harrass": "harass",
    "immediatly": "immediately",
    "independant": "independent",
    "knowlege": "knowledge",
    "libary": "library",
    "neccessary": "necessary",
    "noticable": "noticeable",
    "occassion": "occasion",
    "occured": "occurred",
    "occurence": "occurrence",
    "persistant": "persistent",
    "posession": "possession",
    "prefered": "preferred",
    "recomend": "recommend",
    "refered": "referred",
    "relevent": "relevant",
    "seperate": "separate",
    "sieze": "seize",
    "succesful": "successful",
    "suprise": "surprise",
    "tommorow": "tomorrow",
    "tounge": "tongue",
    "truely": "truly",
    "untill": "until",
    "wierd": "weird",
    "wich": "which",
}

_MISSPELLED = re.compile(r"\b(" + "|".join(map(re.escape, MISSPELLINGS)) + r")\b", re.IGNORECASE)
_DIRECTIVE = re.compile(r"#(delay|hang|fail|fail-times|replies|reply)(?=[ \t]|$)(.*)")
_ARGUMENTS = {"delay": 1, "hang": 0, "fail": 1, "fail-times": 1, "reply": 0, "replies": 0}


def correct(text: str) -> str:
    """``text`` with the built-in misspellings fixed (``Teh`` -> ``The``)."""

    def fix(match: re.Match[str]) -> str:
        word = match.group(0)
        # IGNORECASE also matches letters that lower() keeps apart (ſ, ı):
        # such a word is not one of ours; leave it as it is.
        right = MISSPELLINGS.get(word.lower())
        if right is None:
            return word
        return right[0].upper() + right[1:] if word[0].isupper() else right

    return _MISSPELLED.sub(fix, text)


@attrs.frozen
class Script:
    """What the directives at the head of a message ask for."""

    text: str
    delay: float = 0.0
    hang: bool = False
    fail: int | None = None
    fail_times: int = 0
    verbatim: bool = False
    replies: tuple[str, ...] = ()


def parse(message: str) -> Script:
    """Split the directive lines off the head of ``message``.

    A line that merely starts with ``#`` (a Markdown heading, a hashtag) is
    text; a known directive with a bad argument is a ``PermanentError``, as
    a provider would answer a malformed request with a 400."""
    delay, hang, fail, fail_times = 0.0, False, None, 0
    rest = message
    while rest.startswith("#"):
        line, newline, after = rest.partition("\n")
        match = _DIRECTIVE.fullmatch(line.rstrip("\r"))
        if match is None:
            break
        name, words = match.group(1), match.group(2).split()
        if len(words) != _ARGUMENTS[name]:
            wanted = f"{_ARGUMENTS[name]} argument" + ("" if _ARGUMENTS[name] == 1 else "s")
            raise PermanentError(f"#{name} takes {wanted}, got {line.strip()!r}", status=400)
        arg = words[0] if words else None
        if name == "reply":
            return Script(after, delay, hang, fail, fail_times, verbatim=True)
        if name == "replies":
            lines = tuple(after.splitlines()) or ("",)
            return Script(lines[0], delay, hang, fail, fail_times, verbatim=True, replies=lines)
        if name == "hang":
            hang = True
        elif name == "delay":
            delay = _number(name, arg)
        elif name == "fail":
            fail = int(_number(name, arg, integer=True))
            if not 400 <= fail <= 599:
                raise PermanentError(
                    f"#fail needs an HTTP error status (400-599), got {fail}", status=400
                )
        else:
            fail_times = int(_number(name, arg, integer=True))
        rest = after if newline else ""
    return Script(rest, delay, hang, fail, fail_times)


def _number(name: str, arg: str | None, *, integer: bool = False) -> float:
    try:
        value = int(arg or "") if integer else float(arg or "")
    except ValueError:
        kind = "an integer" if integer else "a number"
        raise PermanentError(f"#{name} needs {kind} argument, got {arg!r}", status=400) from None
    if not math.isfinite(value) or value < 0:
        raise PermanentError(f"#{name} needs a non-negative number, got {arg!r}", status=400)
    return value


def _steering(request: Request) -> str:
    """The user message whose directives steer this reply: the last one,
    unless the first holds a ``#replies`` conversation (a first message whose
    directives are malformed steers nothing: the last one is judged)."""
    first = next((m.content for m in request.messages if m.role == "user"), "")
    try:
        steers = "#replies" in first and bool(parse(first).replies)
    except PermanentError:
        steers = False
    return first if steers else request.last_user_text


def _words(text: str) -> int:
    return len(text.split())


class ScriptedAdapter:
    """The embedded default provider. ``calls`` counts sends; with
    ``call_log`` each send also appends ``"<command id> <attempt>"`` to that
    file, so tests can count calls across processes."""

    def __init__(
        self,
        name: str = "scripted",
        *,
        max_in_flight: int = 256,
        on_interrupt: str = "retry",
        call_log: str | os.PathLike[str] | None = None,
    ) -> None:
        self.settings = AdapterSettings(
            name=name,
            max_in_flight=max_in_flight,
            timeout=30.0,
            on_interrupt="dead" if on_interrupt == "dead" else "retry",
        )
        self.calls = 0
        self.call_log = Path(call_log) if call_log else None

    @classmethod
    def from_env(cls) -> ScriptedAdapter:
        """The default instance; ``$DOVECOTE_SCRIPTED_LOG`` names a call log."""
        return cls(call_log=os.environ.get("DOVECOTE_SCRIPTED_LOG") or None)

    async def send(self, request: Request, context: SendContext) -> Reply:
        script = self._script(request, context)
        if script.hang:
            await trio.sleep_forever()
        if script.delay:
            await trio.sleep(script.delay)
        return self._reply(request, context, script)

    async def send_many(self, sends: Sequence[tuple[Request, SendContext]], answer: Answer) -> None:
        """``send`` for many requests from one task: those whose script
        answers at once are answered here, in order; each one that waits
        (``#delay``, ``#hang``) waits in a task of its own."""
        async with trio.open_nursery() as nursery:
            for index, (request, context) in enumerate(sends):
                try:
                    script = self._script(request, context)
                except PermanentError as exc:
                    answer(index, exc)
                    continue
                if script.hang or script.delay:
                    nursery.start_soon(self._answer_later, answer, index, request, context, script)
                else:
                    self._answer(answer, index, request, context, script)

    async def _answer_later(
        self, answer: Answer, index: int, request: Request, context: SendContext, script: Script
    ) -> None:
        if script.hang:
            await trio.sleep_forever()
        await trio.sleep(script.delay)
        self._answer(answer, index, request, context, script)

    def _answer(
        self, answer: Answer, index: int, request: Request, context: SendContext, script: Script
    ) -> None:
        """Give ``answer`` what ``script`` answers, or the error it raises."""
        try:
            reply = self._reply(request, context, script)
        except AdapterError as exc:
            answer(index, exc)
        else:
            answer(index, reply)

    def _script(self, request: Request, context: SendContext) -> Script:
        """A send begins: counted, logged, its directives read."""
        self.calls += 1
        if self.call_log is not None:
            with self.call_log.open("a") as log:
                log.write(f"{context.command_id} {context.attempt}\n")
        return parse(_steering(request))

    def _reply(self, request: Request, context: SendContext, script: Script) -> Reply:
        """What ``script`` answers (or the error it raises), once any wait is over."""
        if script.fail is not None:
            raise error_for_status(script.fail, f"scripted failure: HTTP {script.fail}")
        if context.attempt <= script.fail_times:
            raise RetryableError(
                f"scripted failure {context.attempt} of {script.fail_times}: HTTP 503",
                status=503,
            )
        text = script.text if script.verbatim else correct(script.text)
        if script.replies:
            turn = sum(m.role == "assistant" for m in request.messages)
            text = script.replies[min(turn, len(script.replies) - 1)]
        context.report_progress(text)
        prompt_words = sum(_words(m.content) for m in request.messages)
        prompt_words += _words(request.system or "")
        return Reply(text=text, usage=Usage(prompt_words, _words(text)), raw=None)

    async def aclose(self) -> None:
        pass
