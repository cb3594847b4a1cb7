"""Connections: psycopg 3 for the hot paths (COPY, batched upserts), one place for errors."""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg import sql


def libpq_url(url: str) -> str:
    return re.sub(r"^postgres(ql)?(\+psycopg)?://", "postgresql://", url)


def connect(url: str, *, autocommit: bool = False, timeout: float = 5.0) -> psycopg.Connection:
    return psycopg.connect(libpq_url(url), autocommit=autocommit, connect_timeout=max(1, int(timeout)))


@contextmanager
def scratch_database(server_url: str, prefix: str, keep: bool = False) -> Iterator[str]:
    """A new empty database on `server_url`'s server (benchmarks), dropped afterwards unless `keep`."""
    server = libpq_url(server_url)
    name = f"{prefix}_{secrets.token_hex(4)}"
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield urlunsplit(urlsplit(server)._replace(path=f"/{name}"))
    finally:
        if not keep:
            with psycopg.connect(server, autocommit=True) as conn:
                conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def describe_db_error(exc: BaseException) -> str:
    """One line, no secrets: the first line of the driver's message."""
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", msg)
