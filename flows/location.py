"""Where a store lives: a path is a SQLite file, a ``postgresql://`` URL a
PostgreSQL database. One parser for ``--db``, ``$DOVECOTE_DB`` and
``open_engine``, so that every command reads a location the same way.

A URL may carry a password; it must never reach a table, a log, an error
message or a ``repr``. ``PgLocation`` keeps the URL itself out of sight
(``repr=False``) and shows ``display``, the URL without its password;
``scrub`` takes the password out of any text (a driver's error message can
quote the URL it was given).
"""

from __future__ import annotations

import os
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Final, Literal

import attrs

from flows.errors import StoreError

if TYPE_CHECKING:
    from flows.storage import StoreProtocol

SCHEMES: Final = ("postgresql://", "postgres://")


def is_postgres_url(location: str | os.PathLike[str]) -> bool:
    return isinstance(location, str) and location.lower().startswith(SCHEMES)


def location(text: str) -> str | Path:
    """What ``--db`` takes: a URL as given, anything else a path. (An
    ``argparse`` ``type=Path`` would fold a URL's ``//`` into ``/``.)"""
    return text if is_postgres_url(text) else Path(text)


def shown(where: str | os.PathLike[str]) -> str:
    """``where`` as it may be printed: a URL without its password."""
    if isinstance(where, str) and is_postgres_url(where):
        return PgLocation.parse(where).display
    return str(Path(where))


def open_store(
    where: str | os.PathLike[str],
    mode: Literal["write", "existing", "read"] = "write",
) -> StoreProtocol:
    """The store at ``where``: a ``postgresql://`` URL is PostgreSQL, any
    other text or path a SQLite file. ``write`` creates what is missing (an
    engine, ``serve``); ``existing`` needs the database to be there (a
    command that changes one, as ``replay``); ``read`` opens it read-only
    (the commands that only look)."""
    if is_postgres_url(where):
        from flows.pgstore import PostgresStore

        return PostgresStore(str(where), read_only=mode == "read")
    from flows.store import Store

    if mode == "existing":
        return Store.existing(where)
    if mode == "read":
        return Store.for_reading(where)
    return Store(where)


@attrs.frozen
class PgLocation:
    """A PostgreSQL database named by a URL. Credentials come from the URL,
    else from ``PGPASSWORD`` or ``~/.pgpass`` (libpq reads those itself)."""

    url: str = attrs.field(repr=False)
    display: str
    password: str | None = attrs.field(repr=False)

    @classmethod
    def parse(cls, url: str) -> PgLocation:
        """The URL checked as libpq will read it; a ``StoreError`` that does
        not quote the password when it cannot be."""
        # Imported here: psycopg is the 'postgres' extra, needed only by
        # those who use a URL.
        try:
            from psycopg.conninfo import conninfo_to_dict
        except ImportError:
            raise StoreError(
                "a postgresql:// database needs psycopg: pip install 'dovecote[postgres]'"
            ) from None
        password = _password_in(url)
        if url.partition("?")[0].count("@") > 1:
            # libpq would take the rest of the password for the host name,
            # and quote it in every error.
            raise StoreError(
                "not a valid PostgreSQL URL: more than one '@' before the host: "
                "percent-encode an '@' in the user name or password as %40"
            )
        try:
            fields = conninfo_to_dict(url)
        except Exception as exc:
            why = scrub(str(exc), password).strip()
        else:
            why = ""
        if why:  # raised out here: the driver's error, which quotes the URL, is no context
            raise StoreError(f"not a valid PostgreSQL URL: {why}")
        port = str(fields.get("port", ""))
        if port and not all(p.isdigit() and 0 < int(p) < 65536 for p in port.split(",")):
            raise StoreError(f"not a valid PostgreSQL URL: the port {port!r} is not a number")
        password = password or (str(fields["password"]) if fields.get("password") else None)
        return cls(url=url, display=_display(fields), password=password)

    def scrub(self, text: str) -> str:
        return scrub(text, self.password)


def _password_in(url: str) -> str | None:
    """The password of ``url``'s user part, as written and decoded; read
    by hand, since the URL may be one libpq's parser rejects."""
    rest = url.partition("://")[2]
    userinfo, at, _ = rest.rpartition("@")
    if not at or ":" not in userinfo:
        return None
    raw = userinfo.partition(":")[2]
    return raw or None


def scrub(text: str, password: str | None) -> str:
    """``text`` without ``password`` in any of the forms a URL gives it."""
    if not password:
        return text
    for form in {password, urllib.parse.unquote(password), urllib.parse.quote(password)}:
        if form:
            text = text.replace(form, "***")
    return text


def _display(fields: Mapping[str, object]) -> str:
    user = f"{fields['user']}@" if fields.get("user") else ""
    host = str(fields.get("host", ""))
    port = f":{fields['port']}" if fields.get("port") else ""
    where = f"{host}{port}" if host and not host.startswith("/") else f"[{host or 'socket'}]{port}"
    return f"postgresql://{user}{where}/{fields.get('dbname', '')}"
