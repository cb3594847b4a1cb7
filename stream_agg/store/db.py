"""Connections: psycopg 3 for the hot paths (COPY, batched upserts), one place for errors."""

from __future__ import annotations

import re

import psycopg


def libpq_url(url: str) -> str:
    return re.sub(r"^postgres(ql)?(\+psycopg)?://", "postgresql://", url)


def connect(url: str, *, autocommit: bool = False, timeout: float = 5.0) -> psycopg.Connection:
    return psycopg.connect(libpq_url(url), autocommit=autocommit, connect_timeout=max(1, int(timeout)))


def describe_db_error(exc: BaseException) -> str:
    """One line, no secrets: the first line of the driver's message."""
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", msg)
