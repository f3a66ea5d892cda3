"""``dovecote.toml``: which providers exist, and how the engine may use them.

The file says *where* a provider is and how hard it may be pushed; it never
holds a key. ``api_key_env`` names the environment variable that does, so a
config file can be committed, shared and shown in a bug report. Anything that
looks like a key where a variable name belongs, or a key-ish name such as
``api_key``, is refused without echoing its value.

Where the file is found, first match wins:

1. the explicit path (``--config``): it must exist;
2. ``$DOVECOTE_CONFIG``: when set and not empty, it must exist too;
3. ``./dovecote.toml``;
4. ``$XDG_CONFIG_HOME/dovecote/dovecote.toml`` (default ``~/.config/...``).

No file at all is not an error: dovecote then runs on its embedded adapters.

Every problem in a file is reported at once, one per line, each naming the
file, the dotted key and what was expected, e.g.
``dovecote.toml: adapters.local.max_in_flight: expected a positive integer,
got "ten"``, so that one edit fixes them all.

``build_adapters`` builds the HTTP providers (``openai``, ``anthropic``,
``ollama``) and ``llamacpp``, a GGUF file whose llama.cpp server dovecote
runs itself (``adapters/llamacpp.py``). The ``scripted`` and ``human`` kinds
belong to the engine, which builds them itself from ``Config.providers``
(their ``settings`` are parsed here like everyone's); ``build_adapters``
skips them.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, NamedTuple, cast

import attrs

from adapters import anthropic, llamacpp
from adapters.anthropic import AnthropicAdapter
from adapters.base import Adapter, AdapterSettings, Price
from adapters.llamacpp import LlamaCppAdapter
from adapters.ollama import OllamaAdapter
from adapters.openai import OpenAIAdapter

FILE_NAME = "dovecote.toml"
ENV_VAR = "DOVECOTE_CONFIG"

Kind = Literal["openai", "anthropic", "ollama", "llamacpp", "scripted", "human"]
KINDS: tuple[Kind, ...] = ("openai", "anthropic", "ollama", "llamacpp", "scripted", "human")
HTTP_KINDS: tuple[Kind, ...] = ("openai", "anthropic", "ollama")
ENGINE_KINDS: tuple[Kind, ...] = ("scripted", "human")
"""Kinds the engine builds itself; ``build_adapters`` leaves them out."""

SCRIPTED_MAX_IN_FLIGHT = 256
"""The scripted adapter costs nothing, so its default concurrency is high (DESIGN.md)."""

COMMON_KEYS = (
    "kind",
    "max_in_flight",
    "requests_per_minute",
    "tokens_per_minute",
    "price_per_mtok",
    "timeout",
    "on_interrupt",
    "cache",
    "cache_ttl",
    "budget_per_day",
)
HTTP_KEYS = ("base_url", "api_key_env", "model", "stream")
LLAMACPP_KEYS = ("model_path", "n_ctx", "threads", "parallel", "stream")
KIND_KEYS: dict[str, tuple[str, ...]] = {
    "openai": COMMON_KEYS + HTTP_KEYS,
    "anthropic": (*COMMON_KEYS, *HTTP_KEYS, "default_max_tokens"),
    "ollama": COMMON_KEYS + HTTP_KEYS,
    "llamacpp": COMMON_KEYS + LLAMACPP_KEYS,
    "scripted": COMMON_KEYS,
    "human": COMMON_KEYS,
}
ALL_KEYS = tuple(dict.fromkeys(key for keys in KIND_KEYS.values() for key in keys))
REQUIRED: dict[str, tuple[str, ...]] = {
    "openai": ("base_url",),
    "anthropic": ("model",),
    "ollama": ("model",),
}
PRICE_KEYS = ("input", "output")

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SECRET_WORDS = ("key", "token", "secret", "password", "bearer", "credential")
_KEY_PREFIXES = ("sk-", "sk_", "gsk_", "xai-", "hf_", "AIza", "ghp_")


class ConfigError(Exception):
    """A configuration that cannot be used. ``problems`` holds one line per
    problem; the message is all of them."""

    def __init__(self, problems: list[str] | str) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


@attrs.frozen
class ProviderConfig:
    """One ``[adapters.NAME]`` table, checked. ``base_url`` and ``model`` are
    ``None`` when the file leaves them to the adapter's default; the key
    itself is never here, only the name of its variable."""

    name: str
    kind: Kind
    settings: AdapterSettings
    base_url: str | None = None
    api_key_env: str | None = None
    model: str | None = None
    stream: bool = True
    default_max_tokens: int | None = None
    local: LocalModel | None = None
    """For kind ``llamacpp``: the model file and how to run its server."""


@attrs.frozen
class LocalModel:
    """A ``llamacpp`` table's own keys; ``None`` leaves a key to the adapter's default."""

    model_path: str | None = None
    n_ctx: int | None = None
    threads: int | None = None
    parallel: int | None = None


@attrs.frozen
class Config:
    path: Path | None
    providers: tuple[ProviderConfig, ...] = ()

    def provider(self, name: str) -> ProviderConfig | None:
        return next((p for p in self.providers if p.name == name), None)


class KeyStatus(NamedTuple):
    name: str
    kind: str
    api_key_env: str | None
    is_set: bool


# --- finding and loading ------------------------------------------------------------------


def user_config_path(environ: Mapping[str, str]) -> Path:
    xdg = environ.get("XDG_CONFIG_HOME", "")
    # The XDG spec says a relative value is invalid and must be ignored.
    if xdg and Path(xdg).is_absolute():
        base = Path(xdg)
    else:
        home = environ.get("HOME")
        base = (Path(home) if home else Path.home()) / ".config"
    return base / "dovecote" / FILE_NAME


def find_config(explicit: str | Path | None, environ: Mapping[str, str]) -> Path | None:
    """The config file to read, or ``None`` when there is none anywhere.

    A path the user named (argument or ``$DOVECOTE_CONFIG``) must exist:
    silently running without the providers they meant to configure would be
    worse than stopping.
    """
    if explicit is not None:
        path = Path(explicit)
        if not _is_file(path):
            raise ConfigError(f"{path}: no such config file (given with --config)")
        return path
    named = environ.get(ENV_VAR, "")
    if named:
        path = Path(named)
        if not _is_file(path):
            raise ConfigError(f"{path}: no such config file (named by ${ENV_VAR})")
        return path
    for path in (Path(FILE_NAME), user_config_path(environ)):
        if _is_file(path):
            return path
    return None


def _is_file(path: Path) -> bool:
    """``path.is_file()``, which raises for a file it may not look at (a
    directory without search permission, a name too long): that is a config
    error that says which file, not a traceback."""
    try:
        return path.is_file()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None


def load_config(
    explicit: str | Path | None = None, environ: Mapping[str, str] = os.environ
) -> Config:
    path = find_config(explicit, environ)
    if path is None:
        return Config(path=None)
    try:
        text = path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    return parse_config(text, path)


def parse_config(text: str, path: Path) -> Config:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    checker = _Checker(path)
    providers = checker.file(data)
    if checker.problems:
        raise ConfigError(checker.problems)
    return Config(path=path, providers=tuple(providers))


# --- building -----------------------------------------------------------------------------


def build_adapters(config: Config, environ: Mapping[str, str] = os.environ) -> list[Adapter]:
    """The HTTP adapters the file describes, keys read from the environment now.

    A key variable that is named but not set does not stop the others: that
    adapter is built without a key and each of its sends fails permanently,
    naming the variable, without touching the network.
    """
    adapters: list[Adapter] = []
    for provider in config.providers:
        adapter = build_adapter(provider, environ)
        if adapter is not None:
            adapters.append(adapter)
    return adapters


def build_adapter(provider: ProviderConfig, environ: Mapping[str, str]) -> Adapter | None:
    if provider.kind in ENGINE_KINDS:
        return None
    if provider.local is not None:
        return build_llamacpp(provider, provider.local)
    key = environ.get(provider.api_key_env) if provider.api_key_env else None
    common: dict[str, Any] = {
        "api_key": key or None,
        "api_key_env": provider.api_key_env,
        "stream": provider.stream,
    }
    if provider.base_url is not None:
        common["base_url"] = provider.base_url
    if provider.kind == "openai":
        return OpenAIAdapter(provider.settings, model=provider.model, **common)
    assert provider.model is not None, "checked when the file was read"
    if provider.kind == "anthropic":
        return AnthropicAdapter(
            provider.settings,
            model=provider.model,
            default_max_tokens=provider.default_max_tokens or anthropic.DEFAULT_MAX_TOKENS,
            **common,
        )
    return OllamaAdapter(provider.settings, model=provider.model, **common)


def build_llamacpp(provider: ProviderConfig, local: LocalModel) -> LlamaCppAdapter:
    given: dict[str, Any] = {
        "model_path": local.model_path,
        "n_ctx": local.n_ctx,
        "threads": local.threads,
        "parallel": local.parallel,
    }
    return LlamaCppAdapter(
        provider.settings,
        stream=provider.stream,
        **{key: value for key, value in given.items() if value is not None},
    )


def key_status(config: Config, environ: Mapping[str, str] = os.environ) -> list[KeyStatus]:
    """For ``dovecote adapters``: which key variables are set, never their values.
    ``is_set`` is false when a provider names no variable."""
    return [
        KeyStatus(
            p.name,
            p.kind,
            p.api_key_env,
            bool(p.api_key_env and environ.get(p.api_key_env)),
        )
        for p in config.providers
    ]


# --- checking -----------------------------------------------------------------------------


def _dotted(*parts: str) -> str:
    return ".".join(p if _BARE_KEY.fullmatch(p) else json.dumps(p) for p in parts)


def _show(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return f"a {type(value).__name__}"


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _looks_like_key(value: str) -> bool:
    if value.startswith(_KEY_PREFIXES):
        return True
    return len(value) >= 32 and any(c.islower() for c in value) and any(c.isdigit() for c in value)


def _env_example(name: str) -> str:
    return re.sub(r"[^A-Z0-9_]", "_", name.upper()) + "_API_KEY"


@attrs.define
class _Checker:
    path: Path
    problems: list[str] = attrs.field(factory=list)

    def problem(self, key: str, what: str) -> None:
        self.problems.append(f"{self.path}: {key}: {what}")

    def file(self, data: dict[str, Any]) -> list[ProviderConfig]:
        for key in data:
            if key != "adapters" and difflib.get_close_matches(key, ["adapters"], cutoff=0.75):
                self.problem(_dotted(key), 'unknown table; did you mean "adapters"?')
        tables = data.get("adapters", {})
        if not isinstance(tables, dict):
            self.problem("adapters", f"expected a table of adapters, got {_show(tables)}")
            return []
        providers = []
        for name, table in tables.items():
            provider = self.provider(name, table)
            if provider is not None:
                providers.append(provider)
        return providers

    def provider(self, name: str, table: object) -> ProviderConfig | None:
        where = _dotted("adapters", name)
        if not isinstance(table, dict):
            self.problem(where, f"expected a table ([{where}]), got {_show(table)}")
            return None
        before = len(self.problems)
        if not _NAME.fullmatch(name):
            self.problem(
                where,
                "an adapter's name must start with a letter or digit and hold only "
                "letters, digits, '_', '-' and '.'",
            )
        kind = table.get("kind")
        if kind is None:
            self.problem(f"{where}.kind", f"missing; expected one of {', '.join(KINDS)}")
        elif kind not in KINDS:
            self.problem(f"{where}.kind", f"expected one of {', '.join(KINDS)}, got {_show(kind)}")
            kind = None
        self.unknown_keys(name, table, kind)
        for key in REQUIRED.get(kind or "", ()):
            if key not in table:
                self.problem(_dotted("adapters", name, key), f"missing; kind {kind} needs it")

        def get(key: str, check: Any, expected: str) -> Any:
            if key not in table:
                return None
            value = table[key]
            if not check(value):
                self.problem(
                    _dotted("adapters", name, key), f"expected {expected}, got {_show(value)}"
                )
                return None
            return value

        positive = (
            lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0,
            "a positive integer",
        )
        max_in_flight = get("max_in_flight", *positive)
        rpm = get("requests_per_minute", lambda v: _is_number(v) and v > 0, "a positive number")
        tpm = get("tokens_per_minute", lambda v: _is_number(v) and v > 0, "a positive number")
        timeout = get("timeout", lambda v: _is_number(v) and v > 0, "a positive number of seconds")
        on_interrupt = get("on_interrupt", lambda v: v in ("retry", "dead"), '"retry" or "dead"')
        cache = get("cache", lambda v: isinstance(v, bool), "true or false")
        seconds = (lambda v: _is_number(v) and v > 0, "a positive number of seconds")
        cache_ttl = get("cache_ttl", *seconds)
        budget_per_day = get("budget_per_day", lambda v: _is_number(v) and v >= 0, "0 or more")
        base_url = get(
            "base_url",
            lambda v: isinstance(v, str) and re.fullmatch(r"https?://[^/\s]+(/\S*)?", v),
            "an http:// or https:// URL",
        )
        model = get("model", lambda v: isinstance(v, str) and v.strip(), "a model name")
        stream = get("stream", lambda v: isinstance(v, bool), "true or false")
        default_max_tokens = get("default_max_tokens", *positive)
        local = LocalModel(
            model_path=get(
                "model_path", lambda v: isinstance(v, str) and v.strip(), "a path to a GGUF file"
            ),
            n_ctx=get("n_ctx", *positive),
            threads=get("threads", *positive),
            parallel=get("parallel", *positive),
        )
        api_key_env = self.api_key_env(name, table)
        price = self.price(name, table)
        if len(self.problems) > before or kind is None:
            return None
        # Only what the file sets is passed, so AdapterSettings keeps its own defaults.
        given: dict[str, Any] = {
            "max_in_flight": max_in_flight
            or (SCRIPTED_MAX_IN_FLIGHT if kind == "scripted" else None)
            # A llama.cpp server answers `parallel` calls at once; more would only queue there.
            or ((local.parallel or llamacpp.DEFAULT_PARALLEL) if kind == "llamacpp" else None),
            "requests_per_minute": None if rpm is None else float(rpm),
            "tokens_per_minute": None if tpm is None else float(tpm),
            "price": price,
            "timeout": None if timeout is None else float(timeout),
            "on_interrupt": on_interrupt,
            "cache": cache,
            "cache_ttl": None if cache_ttl is None else float(cache_ttl),
            "budget_per_day": None if budget_per_day is None else float(budget_per_day),
        }
        settings = AdapterSettings(
            name=name, **{key: value for key, value in given.items() if value is not None}
        )
        return ProviderConfig(
            name=name,
            kind=cast(Kind, kind),
            settings=settings,
            base_url=base_url.rstrip("/") if base_url else None,
            api_key_env=api_key_env,
            model=model,
            stream=True if stream is None else stream,
            default_max_tokens=default_max_tokens,
            local=local if kind == "llamacpp" else None,
        )

    def unknown_keys(self, name: str, table: dict[str, Any], kind: str | None) -> None:
        allowed = KIND_KEYS[kind] if kind else ALL_KEYS
        for key in table:
            if key in allowed:
                continue
            where = _dotted("adapters", name, key)
            if key in ALL_KEYS:
                users = [k for k, keys in KIND_KEYS.items() if key in keys]
                self.problem(where, f"not used by kind {kind} (only by {', '.join(users)})")
            elif any(word in key.lower() for word in _SECRET_WORDS):
                # The value is never shown: it is most likely the key itself.
                self.problem(
                    where,
                    "API keys never go in the file (the value is not shown here); put the "
                    "key in an environment variable and name that variable with "
                    f'api_key_env = "{_env_example(name)}"',
                )
            else:
                close = difflib.get_close_matches(key, allowed, n=1)
                hint = f"did you mean {close[0]}? " if close else ""
                self.problem(where, f"unknown key; {hint}(expected one of {', '.join(allowed)})")

    def api_key_env(self, name: str, table: dict[str, Any]) -> str | None:
        value = table.get("api_key_env")
        if value is None:
            return None
        where = _dotted("adapters", name, "api_key_env")
        if not isinstance(value, str) or not _ENV_NAME.fullmatch(value) or _looks_like_key(value):
            self.problem(
                where,
                "expected the NAME of an environment variable "
                f'(like "{_env_example(name)}"), got a value that is not one and may be a '
                "key itself (not shown): API keys never go in the file",
            )
            return None
        return value

    def price(self, name: str, table: dict[str, Any]) -> Price | None:
        value = table.get("price_per_mtok")
        if value is None:
            return None
        where = _dotted("adapters", name, "price_per_mtok")
        if not isinstance(value, dict):
            self.problem(
                where,
                "expected a table of US dollars per million tokens like "
                f"{{ input = 0.15, output = 0.60 }}, got {_show(value)}",
            )
            return None
        ok = True
        for key, amount in value.items():
            if key not in PRICE_KEYS:
                self.problem(f"{where}.{_dotted(key)}", "unknown key; expected input or output")
                ok = False
            elif not (_is_number(amount) and amount >= 0):
                self.problem(
                    f"{where}.{_dotted(key)}",
                    f"expected a non-negative number of US dollars, got {_show(amount)}",
                )
                ok = False
        if not ok:
            return None
        return Price(input=float(value.get("input", 0.0)), output=float(value.get("output", 0.0)))


__all__ = [
    "ENGINE_KINDS",
    "HTTP_KINDS",
    "KINDS",
    "Config",
    "ConfigError",
    "KeyStatus",
    "LocalModel",
    "ProviderConfig",
    "build_adapter",
    "build_adapters",
    "build_llamacpp",
    "find_config",
    "key_status",
    "load_config",
    "parse_config",
]
