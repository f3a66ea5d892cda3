"""``dovecote.toml``: where it is found, what it may say, how it fails."""

from __future__ import annotations

from pathlib import Path

import pytest

from adapters.anthropic import AnthropicAdapter
from adapters.base import AdapterSettings, Message, PermanentError, Price, Request
from adapters.config import (
    Config,
    ConfigError,
    KeyStatus,
    ProviderConfig,
    build_adapters,
    find_config,
    key_status,
    load_config,
)
from adapters.ollama import OllamaAdapter
from adapters.openai import OpenAIAdapter
from tests.fake_providers import SECRET, assert_secret_free, context

DESIGN_EXAMPLE = """\
[adapters.local]                 # the adapter's name
kind = "openai"                  # openai | anthropic | ollama | scripted | human
base_url = "http://127.0.0.1:8080/v1"
api_key_env = "LOCAL_LLM_KEY"    # NAME of an env var, optional for local servers
model = "qwen2.5-0.5b-instruct"
max_in_flight = 16
requests_per_minute = 600
tokens_per_minute = 200000
price_per_mtok = { input = 0.15, output = 0.60 }
timeout = 60
stream = true
on_interrupt = "retry"           # or "dead"
"""

MORE = """
[adapters.claude]
kind = "anthropic"
model = "claude-sonnet-4-20250514"
api_key_env = "ANTHROPIC_API_KEY"
default_max_tokens = 2048
on_interrupt = "dead"

[adapters.llama]
kind = "ollama"
model = "llama3.2"
stream = false

[adapters.scripted]
kind = "scripted"

[adapters.editor]
kind = "human"
timeout = 3600
"""


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory of our own, so ``./dovecote.toml`` is ours."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def problems(text: str) -> list[str]:
    """The problems a ``./dovecote.toml`` holding ``text`` is reported with."""
    Path("dovecote.toml").write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_config(environ={})
    assert str(caught.value) == "\n".join(caught.value.problems)
    return caught.value.problems


def one_problem(text: str) -> str:
    found = problems(text)
    assert len(found) == 1, found
    return found[0]


# --- a good file --------------------------------------------------------------------------


def test_the_design_example_reads_into_settings(in_tmp: Path) -> None:
    Path("dovecote.toml").write_text(DESIGN_EXAMPLE)
    config = load_config(environ={})
    assert config == Config(
        path=Path("dovecote.toml"),
        providers=(
            ProviderConfig(
                name="local",
                kind="openai",
                base_url="http://127.0.0.1:8080/v1",
                api_key_env="LOCAL_LLM_KEY",
                model="qwen2.5-0.5b-instruct",
                stream=True,
                settings=AdapterSettings(
                    name="local",
                    max_in_flight=16,
                    requests_per_minute=600,
                    tokens_per_minute=200000,
                    price=Price(input=0.15, output=0.60),
                    timeout=60,
                    on_interrupt="retry",
                ),
            ),
        ),
    )


def test_build_adapters_builds_http_kinds_with_keys_from_the_environment(in_tmp: Path) -> None:
    Path("dovecote.toml").write_text(DESIGN_EXAMPLE + MORE)
    environ = {"LOCAL_LLM_KEY": SECRET, "ANTHROPIC_API_KEY": "ak-other"}
    config = load_config(environ=environ)
    local, claude, llama = build_adapters(config, environ)
    assert isinstance(local, OpenAIAdapter) and local.api_key == SECRET
    assert local.base_url == "http://127.0.0.1:8080/v1" and local.model == "qwen2.5-0.5b-instruct"
    assert isinstance(claude, AnthropicAdapter) and claude.api_key == "ak-other"
    assert claude.default_max_tokens == 2048 and claude.settings.on_interrupt == "dead"
    assert claude.base_url == "https://api.anthropic.com"
    assert isinstance(llama, OllamaAdapter) and llama.api_key is None and llama.stream is False
    assert_secret_free(config, local)
    # The engine builds these two itself, from the settings read here.
    scripted, editor = (config.provider("scripted"), config.provider("editor"))
    assert scripted is not None and scripted.settings.max_in_flight == 256
    assert editor is not None and editor.kind == "human" and editor.settings.timeout == 3600


async def test_a_key_variable_that_is_not_set_fails_each_send_naming_it(in_tmp: Path) -> None:
    Path("dovecote.toml").write_text(DESIGN_EXAMPLE)
    [adapter] = build_adapters(load_config(environ={}), environ={})
    try:
        with pytest.raises(PermanentError) as caught:
            await adapter.send(Request(messages=(Message("user", "hi"),)), context())
    finally:
        await adapter.aclose()
    assert "LOCAL_LLM_KEY" in caught.value.message


def test_key_status_says_which_variables_are_set_without_their_values(in_tmp: Path) -> None:
    Path("dovecote.toml").write_text(DESIGN_EXAMPLE + MORE)
    environ = {"LOCAL_LLM_KEY": SECRET, "ANTHROPIC_API_KEY": ""}
    status = key_status(load_config(environ=environ), environ)
    assert status == [
        KeyStatus("local", "openai", "LOCAL_LLM_KEY", True),
        KeyStatus("claude", "anthropic", "ANTHROPIC_API_KEY", False),
        KeyStatus("llama", "ollama", None, False),
        KeyStatus("scripted", "scripted", None, False),
        KeyStatus("editor", "human", None, False),
    ]
    assert_secret_free(*status)


# --- where the file is ---------------------------------------------------------------------


def write(path: Path, name: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'[adapters.{name}]\nkind = "scripted"\n')
    return path


def test_search_order(in_tmp: Path) -> None:
    explicit = write(in_tmp / "a" / "explicit.toml", "explicit")
    named = write(in_tmp / "b" / "named.toml", "named")
    here = write(in_tmp / "dovecote.toml", "here")
    xdg = write(in_tmp / "xdg" / "dovecote" / "dovecote.toml", "xdg")
    home = write(in_tmp / "home" / ".config" / "dovecote" / "dovecote.toml", "home")
    environ = {
        "DOVECOTE_CONFIG": str(named),
        "XDG_CONFIG_HOME": str(in_tmp / "xdg"),
        "HOME": str(in_tmp / "home"),
    }
    assert find_config(explicit, environ) == explicit
    assert find_config(None, environ) == named
    del environ["DOVECOTE_CONFIG"]
    assert find_config(None, environ) == Path("dovecote.toml") and here.exists()
    here.unlink()
    assert find_config(None, environ) == xdg
    environ["XDG_CONFIG_HOME"] = "relative/is/ignored"
    assert find_config(None, environ) == home
    home.unlink()
    assert find_config(None, environ) is None
    assert load_config(environ=environ) == Config(path=None, providers=())
    config = load_config(str(explicit), environ)
    assert [p.name for p in config.providers] == ["explicit"]


def test_a_named_file_that_does_not_exist_is_an_error(in_tmp: Path) -> None:
    write(in_tmp / "dovecote.toml", "here")
    with pytest.raises(ConfigError, match=r"missing\.toml: no such config file \(given with"):
        load_config("missing.toml", environ={})
    with pytest.raises(ConfigError, match=r"gone\.toml: no such config file \(named by"):
        load_config(environ={"DOVECOTE_CONFIG": "gone.toml"})


# --- what a bad file is told ---------------------------------------------------------------


def test_a_wrong_value_names_the_file_the_key_and_what_is_expected(in_tmp: Path) -> None:
    text = DESIGN_EXAMPLE.replace("max_in_flight = 16", 'max_in_flight = "ten"')
    assert one_problem(text) == (
        'dovecote.toml: adapters.local.max_in_flight: expected a positive integer, got "ten"'
    )


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("max_in_flight = 0", "adapters.local.max_in_flight: expected a positive integer, got 0"),
        ("max_in_flight = true",
         "adapters.local.max_in_flight: expected a positive integer, got true"),
        ("timeout = -1", "adapters.local.timeout: expected a positive number of seconds, got -1"),
        ("requests_per_minute = nan",
         "adapters.local.requests_per_minute: expected a positive number, got nan"),
        ('on_interrupt = "later"',
         'adapters.local.on_interrupt: expected "retry" or "dead", got "later"'),
        ('stream = "yes"', 'adapters.local.stream: expected true or false, got "yes"'),
        ('base_url = "127.0.0.1:8080"',
         'adapters.local.base_url: expected an http:// or https:// URL, got "127.0.0.1:8080"'),
        ("price_per_mtok = 3",
         "adapters.local.price_per_mtok: expected a table of US dollars per million tokens "
         "like { input = 0.15, output = 0.60 }, got 3"),
        ("price_per_mtok = { input = 1, ouput = 2 }",
         "adapters.local.price_per_mtok.ouput: unknown key; expected input or output"),
        ("price_per_mtok = { input = -1 }",
         "adapters.local.price_per_mtok.input: expected a non-negative number of US dollars, "
         "got -1"),
        ("max_inflight = 3",
         "adapters.local.max_inflight: unknown key; did you mean max_in_flight? (expected one of "
         "kind, max_in_flight, requests_per_minute, tokens_per_minute, price_per_mtok, timeout, "
         "on_interrupt, cache, cache_ttl, budget_per_day, base_url, api_key_env, model, stream)"),
        ('cache = "yes"', 'adapters.local.cache: expected true or false, got "yes"'),
        ("cache_ttl = 0", "adapters.local.cache_ttl: expected a positive number of seconds, got 0"),
        ("budget_per_day = -1", "adapters.local.budget_per_day: expected 0 or more, got -1"),
        ("budget_per_day = nan", "adapters.local.budget_per_day: expected 0 or more, got nan"),
        ("default_max_tokens = 100",
         "adapters.local.default_max_tokens: not used by kind openai (only by anthropic)"),
    ],
)  # fmt: skip
def test_each_kind_of_wrong_value(in_tmp: Path, line: str, message: str) -> None:
    url = "" if line.startswith("base_url") else 'base_url = "http://h/v1"\n'
    text = f'[adapters.local]\nkind = "openai"\n{url}{line}\n'
    assert one_problem(text) == f"dovecote.toml: {message}"


def test_toml_syntax_errors_give_the_line(in_tmp: Path) -> None:
    found = one_problem('[adapters.local]\nkind = "openai"\nmodel = qwen\n')
    assert found.startswith("dovecote.toml: invalid TOML: ")
    assert "line 3" in found


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[adapters.x]\nmodel = "m"\n',
         "adapters.x.kind: missing; expected one of openai, anthropic, ollama, llamacpp, "
         "scripted, human"),
        ('[adapters.x]\nkind = "gemini"\n',
         'adapters.x.kind: expected one of openai, anthropic, ollama, llamacpp, scripted, human, '
         'got "gemini"'),
        ('[adapters.x]\nkind = "openai"\n', "adapters.x.base_url: missing; kind openai needs it"),
        ('[adapters.x]\nkind = "anthropic"\n',
         "adapters.x.model: missing; kind anthropic needs it"),
        ('[adapters.x]\nkind = "ollama"\n', "adapters.x.model: missing; kind ollama needs it"),
        ('[adapters.x]\nkind = "scripted"\nbase_url = "http://h"\n',
         "adapters.x.base_url: not used by kind scripted (only by openai, anthropic, ollama)"),
        ("adapters = 3\n", "adapters: expected a table of adapters, got 3"),
        ("[adapters]\nx = 3\n", "adapters.x: expected a table ([adapters.x]), got 3"),
        ('[adapter.x]\nkind = "scripted"\n', 'adapter: unknown table; did you mean "adapters"?'),
        ('[adapters."my model"]\nkind = "scripted"\n',
         "adapters.\"my model\": an adapter's name must start with a letter or digit and hold "
         "only letters, digits, '_', '-' and '.'"),
    ],
)  # fmt: skip
def test_missing_and_misplaced_keys(in_tmp: Path, text: str, message: str) -> None:
    assert one_problem(text) == f"dovecote.toml: {message}"


def test_every_problem_is_reported_at_once(in_tmp: Path) -> None:
    text = (
        '[adapters.a]\nkind = "openai"\nbase_url = "http://h"\ntimeout = "soon"\n'
        '[adapters.b]\nkind = "anthropic"\nmax_in_flight = -2\n'
    )
    assert problems(text) == [
        'dovecote.toml: adapters.a.timeout: expected a positive number of seconds, got "soon"',
        "dovecote.toml: adapters.b.model: missing; kind anthropic needs it",
        "dovecote.toml: adapters.b.max_in_flight: expected a positive integer, got -2",
    ]


@pytest.mark.parametrize("key", ["api_key", "key", "OPENAI_API_KEY", "token"])
def test_a_key_in_the_file_is_refused_without_repeating_it(in_tmp: Path, key: str) -> None:
    text = f'[adapters.local]\nkind = "openai"\nbase_url = "http://h"\n{key} = "{SECRET}"\n'
    found = one_problem(text)
    assert found.startswith(f"dovecote.toml: adapters.local.{key}: API keys never go in the file")
    assert 'api_key_env = "LOCAL_API_KEY"' in found
    assert SECRET not in found


@pytest.mark.parametrize("value", [SECRET, "sk_live_0123456789abcdef", "my key"])
def test_a_key_where_its_variables_name_belongs_is_refused_unseen(in_tmp: Path, value: str) -> None:
    text = f'[adapters.local]\nkind = "openai"\nbase_url = "http://h"\napi_key_env = "{value}"\n'
    found = one_problem(text)
    assert found.startswith(
        "dovecote.toml: adapters.local.api_key_env: expected the NAME of an environment variable"
    )
    assert value not in found


def test_the_key_is_only_ever_read_from_the_environment(in_tmp: Path) -> None:
    """Even a variable that happens to share a name with a file key is read
    from the environment, and nothing in the file becomes a key."""
    Path("dovecote.toml").write_text(DESIGN_EXAMPLE)
    [adapter] = build_adapters(load_config(environ={}), environ={"LOCAL_LLM_KEY": "from-env"})
    assert isinstance(adapter, OpenAIAdapter) and adapter.api_key == "from-env"
    [adapter] = build_adapters(load_config(environ={}), environ={})
    assert isinstance(adapter, OpenAIAdapter) and adapter.api_key is None
