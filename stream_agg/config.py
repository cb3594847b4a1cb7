"""Settings from `STREAM_AGG_*` environment variables, overridable by CLI flags.

Every setting is declared once here (name, type, default, help) so that the CLI,
the README's settings table and the docker-compose check read the same list.
Values are validated at start; a bad value raises `ConfigError` with one clear line.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

ENV_PREFIX = "STREAM_AGG_"


class ConfigError(ValueError):
    """A setting has a value the program cannot run with."""


def _parse_duration(text: str) -> float:
    """'5', '5s', '250ms', '2m', '1h', '7d' -> seconds."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(ms|s|m|h|d|w)?\s*", str(text))
    if not m:
        raise ValueError(f"not a duration: {text!r} (use e.g. 5s, 250ms, 2m, 1h, 7d)")
    value = float(m.group(1))
    unit = m.group(2) or "s"
    return value * {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[unit]


def _parse_bool(text: str) -> bool:
    low = str(text).strip().lower()
    if low in {"1", "true", "yes", "on"}:
        return True
    if low in {"0", "false", "no", "off"}:
        return False
    raise ValueError(f"not a boolean: {text!r} (use true/false)")


def _parse_caps(text: str) -> dict[str, int]:
    """'user=1000,kb=500' -> {'user': 1000, 'kb': 500}."""
    caps: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in str(text).split(","))):
        name, _, num = part.partition("=")
        if not num or int(num) < 1:
            raise ValueError(f"bad cap {part!r} (use dimension=K with K >= 1)")
        caps[name.strip()] = int(num)
    return caps


def _positive(conv: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        value = conv(text)
        if value <= 0:
            raise ValueError(f"must be > 0, got {text!r}")
        return value

    return parse


def _non_negative(conv: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        value = conv(text)
        if value < 0:
            raise ValueError(f"must be >= 0, got {text!r}")
        return value

    return parse


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise ValueError(f"not a TCP port: {text!r}")
    return value


def _db_url(text: str) -> str:
    if not re.match(r"^postgres(ql)?(\+psycopg)?://", text):
        raise ValueError("must start with postgresql:// (e.g. postgresql://user@host:5432/db)")
    return text


def _bootstrap(text: str) -> str:
    for hostport in text.split(","):
        host, _, port = hostport.strip().rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"bootstrap servers must be host:port[,host:port], got {text!r}")
    return text


@dataclass(frozen=True)
class Setting:
    name: str
    parse: Callable[[str], Any]
    default: str
    help: str
    secret: bool = False

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()


SETTINGS: tuple[Setting, ...] = (
    Setting("kafka_bootstrap", _bootstrap, "127.0.0.1:9092", "Kafka bootstrap servers, host:port[,host:port]"),
    Setting("database_url", _db_url, "postgresql://postgres@127.0.0.1:5432/postgres",
            "PostgreSQL URL (password is never logged)", secret=True),
    Setting("topic", str, "traces.completed", "Topic that carries completed-trace events"),
    Setting("dlq_topic", str, "", "Dead-letter topic (default: <topic>.dlq)"),
    Setting("group_id", str, "stream-agg", "Consumer group (and Faust app id) of the workers"),
    Setting("partitions", _positive(int), "8", "Partitions created for the topic if it does not exist"),
    Setting("flush_interval", _positive(_parse_duration), "5s",
            "How often changed buckets are upserted, counted from when the worker gets its first "
            "partitions (under load: at least twice the last flush's duration; at the end of a backlog, "
            "i.e. every partition folded to its high watermark, or after 1 s without messages: at once, "
            "at most one flush a second; a flush due when the rest of a backlog would take at most "
            "three quarters of this to fold waits for that end, for at most one more interval)"),
    Setting("grace", _non_negative(_parse_duration), "60s", "A bucket closes when the watermark passes end + grace"),
    Setting("out_of_orderness", _non_negative(_parse_duration), "30s",
            "Allowed disorder: watermark = max event time seen - this"),
    Setting("late_horizon", _positive(_parse_duration), "7d",
            "Events older than watermark - this go to the DLQ as too_late"),
    Setting("idle_timeout", _positive(_parse_duration), "60s",
            "A partition silent this long advances its watermark with wall-clock time"),
    Setting("cardinality_caps", _parse_caps, "user=1000",
            "Max distinct values per bucket and dimension; the rest fold into __other__"),
    Setting("batch_size", _positive(int), "5000",
            "Messages taken per micro-batch (a micro-batch also ends at 16 MB of payload, "
            "or after STREAM_AGG_BATCH_TIMEOUT)"),
    Setting("batch_timeout", _positive(_parse_duration), "0.2s",
            "Max wait to fill a micro-batch (1s suits topics of single-event messages: fewer, "
            "bigger folds; behind a backlog a micro-batch also ends once every partition is taken to its end)"),
    Setting("archive", _parse_bool, "true", "Write valid events to the raw traces/spans tables"),
    Setting("max_pending_events", _positive(int), "2000000",
            "Folded-but-unflushed events at which consumption pauses until a flush succeeds (PostgreSQL "
            "down, or flushes slower than the fold)"),
    Setting("closed_cache_states", _non_negative(int), "500000",
            "States of closed buckets kept in memory after their final flush, so late events fold "
            "in without reading the bucket back from PostgreSQL; least recently folded into go "
            "first (0 = evict at close)"),
    Setting("prune_interval", _non_negative(_parse_duration), "10m",
            "How often a worker deletes the stream state (partial blobs, deltas, cap cuts) of buckets "
            "that end before every partition's watermark - STREAM_AGG_LATE_HORIZON, which no event can "
            "change any more; their metrics_aggregates rows stay (0 = never)"),
    Setting("decode_processes", _non_negative(int), "1",
            "Helper processes decoding messages ahead of the fold (0 = decode in the worker process)"),
    Setting("metrics_port", _port, "9108", "Prometheus metrics HTTP port (0 = off)"),
    Setting("session_timeout", _positive(_parse_duration), "30s",
            "Kafka consumer session timeout (a dead worker's partitions move after this)"),
    Setting("heartbeat_interval", _positive(_parse_duration), "3s", "Kafka consumer heartbeat interval"),
    Setting("rebalance_timeout", _positive(_parse_duration), "60s",
            "Kafka rebalance timeout (small values make group joins fast)"),
    Setting("log_level", str, "INFO", "Log level"),
    Setting("max_range", _positive(_parse_duration), "90d",
            "Longest backfill/replay/verify range accepted without --yes"),
)

_BY_NAME = {s.name: s for s in SETTINGS}


@dataclass(frozen=True)
class Config:
    """Validated settings. Build with `load_config`."""

    kafka_bootstrap: str
    database_url: str
    topic: str
    dlq_topic: str
    group_id: str
    partitions: int
    flush_interval: float
    grace: float
    out_of_orderness: float
    late_horizon: float
    idle_timeout: float
    cardinality_caps: dict[str, int] = field(hash=False)
    batch_size: int
    batch_timeout: float
    archive: bool
    max_pending_events: int
    closed_cache_states: int
    prune_interval: float
    decode_processes: int
    metrics_port: int
    session_timeout: float
    heartbeat_interval: float
    rebalance_timeout: float
    log_level: str
    max_range: float

    @property
    def dlq(self) -> str:
        return self.dlq_topic or f"{self.topic}.dlq"

    @property
    def sqlalchemy_url(self) -> str:
        """The URL with the psycopg 3 driver selected."""
        url = re.sub(r"^postgres(ql)?(\+psycopg)?://", "postgresql+psycopg://", self.database_url)
        return url

    @property
    def libpq_url(self) -> str:
        return re.sub(r"^postgres(ql)?(\+psycopg)?://", "postgresql://", self.database_url)

    def with_overrides(self, **overrides: Any) -> Config:
        """Apply CLI flags (raw strings or typed values); None means 'not given'."""
        given = {k: v for k, v in overrides.items() if v is not None}
        parsed: dict[str, Any] = {}
        for key, value in given.items():
            if key not in _BY_NAME:
                raise ConfigError(f"unknown setting {key!r}")
            parsed[key] = _parse_one(_BY_NAME[key], value) if isinstance(value, str) else value
        return replace(self, **parsed)

    def redacted(self) -> dict[str, Any]:
        """Settings for logging: secrets masked."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if _BY_NAME[f.name].secret:
                value = redact_url(str(value))
            out[f.name] = value
        return out


def redact_url(url: str) -> str:
    """postgresql://u:secret@h/db -> postgresql://u:***@h/db."""
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", url)


def _parse_one(setting: Setting, raw: str) -> Any:
    try:
        return setting.parse(raw)
    except (ValueError, TypeError) as exc:
        shown = redact_url(raw) if setting.secret else raw
        raise ConfigError(f"{setting.env}={shown!r}: {exc}") from None


def load_config(env: Mapping[str, str] | None = None, **overrides: Any) -> Config:
    """Read STREAM_AGG_* from `env` (default os.environ), then apply overrides."""
    env = os.environ if env is None else env
    values = {s.name: _parse_one(s, env.get(s.env, s.default)) for s in SETTINGS}
    return Config(**values).with_overrides(**overrides)
