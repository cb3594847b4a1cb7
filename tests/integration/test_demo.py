"""`stream-agg demo` as a user runs it: real aggregates, then nothing left running."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import psycopg
import pytest

from stream_agg.devstack import free_port

SENT = re.compile(r"sent ([\d,]+) events \(([\d,]+) on time, ([\d,]+) late, ([\d,]+) too late\) and ([\d,]+) "
                  r"invalid messages; ([\d,]+) aggregated")
DLQ = re.compile(r"DLQ ([\d,]+) \(invalid ([\d,]+), too late ([\d,]+)\)")


def num(text: str) -> int:
    return int(text.replace(",", ""))


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAM_AGG_")}
    env.update(extra)
    return env


class Watched:
    """The demo as a child in its own process group (like a terminal job), its descendants recorded."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        with open(log, "wb") as out:
            self.proc = psutil.Popen([sys.executable, "-m", "stream_agg", "demo", *args], env=env, stdout=out,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.seen: dict[int, float] = {}  # pid -> create_time, to tell a reused pid apart

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def record(self) -> None:
        try:
            for child in self.proc.children(recursive=True):
                self.seen.setdefault(child.pid, child.create_time())
        except psutil.Error:
            pass

    def wait(self, timeout: float, until: str | None = None) -> int | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.record()
            if until is not None and until in self.output():
                return None
            if self.proc.poll() is not None:
                return self.proc.returncode
            time.sleep(0.3)
        self.proc.kill()
        pytest.fail(f"demo still running after {timeout} s:\n{self.output()[-4000:]}")

    def left_running(self) -> list[str]:
        left = []
        for pid, created in self.seen.items():
            try:
                p = psutil.Process(pid)
                if p.create_time() == created and p.status() != psutil.STATUS_ZOMBIE:
                    left.append(f"{pid} {' '.join(p.cmdline())[:120]}")
            except psutil.NoSuchProcess:
                continue
        return left


def query(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "stream_agg", "query", *args], env=env, capture_output=True,
                          text=True, timeout=60)


def test_demo_for_60_seconds_aggregates_everything_and_stops_everything(database_url, tmp_path):
    env = clean_env(STREAM_AGG_DATABASE_URL=database_url)
    demo = Watched(["--duration", "60", "--metrics-port", str(free_port())], env, tmp_path / "demo.log")
    code = demo.wait(150)
    out = demo.output()
    assert code == 0, out[-4000:]

    # What it started, by its own account and as seen from outside, is gone.
    pids = dict(re.findall(r"(worker|broker|postgres)=(\d+)", out.split("demo pids:", 1)[1].splitlines()[0]))
    assert {"worker", "broker"} <= set(pids)
    assert {int(p) for p in pids.values()} <= set(demo.seen)
    assert demo.left_running() == []
    assert "nothing left running" in out

    # Live snapshots, then a final one after the worker caught up with everything sent.
    assert out.count("by operation type (traces, current hour)") >= 6  # every 10 s without a terminal
    final = out.split("final · topic", 1)[1]
    assert "the worker had not caught up" not in out
    all_row = re.search(r"^\s+all\s+([\d,]+)\s+([\d.]+)%", final, re.M)
    assert all_row and num(all_row.group(1)) > 10_000  # ~500 events/s for 60 s in the current hour
    assert len(re.findall(r"^\s+(chat|search|generation|summarize|embed|agent)\s+[\d,]+", final, re.M)) >= 5
    assert re.search(r"^\s+gpt-4o-mini\s+[\d,]+", final, re.M)
    total, on_time, late, too_late, invalid, aggregated = map(num, SENT.search(out).groups())  # type: ignore[union-attr]
    assert total == on_time + late + too_late and aggregated == on_time + late
    assert late > 0 and too_late > 0 and invalid > 0
    dlq, dlq_invalid, dlq_too_late = map(num, DLQ.search(final).groups())  # type: ignore[union-attr]
    assert (dlq, dlq_invalid, dlq_too_late) == (invalid + too_late, invalid, too_late)

    # `stream-agg query` reads the same rows: every aggregated event is in an hour row.
    res = query(env, "--metric", "trace.duration_ms", "--dimension", "all", "--since", "4h", "--format", "json")
    assert res.returncode == 0, res.stderr
    rows = json.loads(res.stdout)
    assert sum(r["count"] for r in rows) == aggregated
    assert len(rows) >= 2  # the current hour and the late events' hours
    res = query(env, "--metric", "trace.duration_ms", "--dimension", "operation_type", "--since", "1h")
    assert res.returncode == 0 and re.search(r"\schat\s+\d+", res.stdout), res.stdout + res.stderr


def test_ctrl_c_stops_everything_and_removes_the_demo_database(tmp_path, default_metrics_port):
    """No settings at all (the README's first command): Ctrl-C to the whole job, as a terminal sends it."""
    demo = Watched(["--refresh", "2"], clean_env(), tmp_path / "demo.log")
    demo.wait(120, until="by operation type")
    os.killpg(demo.proc.pid, signal.SIGINT)
    code = demo.wait(90)
    out = demo.output()
    assert code == 0, out[-4000:]
    assert "stopping (interrupted)" in out and "nothing left running" in out
    assert demo.left_running() == []
    created = re.search(r"database (stream_agg_demo_[0-9a-f]+) on (\S+) \(dropped at the end\)", out)
    if created:  # it found a PostgreSQL and made a database of its own there: gone again
        with psycopg.connect(created.group(2)) as conn:
            names = {r[0] for r in conn.execute("SELECT datname FROM pg_database").fetchall()}
        assert created.group(1) not in names
    else:
        assert "postgres=" in out  # an embedded PostgreSQL, whose pid was checked above


# ----------------------------------------------------------------------------- the parts, without services


def test_stream_mix_is_exact_and_stamped_around_now():
    from datetime import datetime

    from stream_agg.ops.demo import DemoStream

    stream = DemoStream("unused:9092", "unused", rate=500, seed=7)
    now = 1_780_000_000.0
    got: dict[str, list] = {"on_time": [], "late": [], "too_late": [], "invalid": []}
    for tick in range(40):  # 10 s of 0.25 s ticks
        for name, part in zip(got, stream.batch(now + tick * 0.25, 0.25), strict=True):
            got[name].extend(part)
    # Fractions carried between ticks: exactly rate x 10 s x fraction, however the ticks cut.
    assert {k: len(v) for k, v in got.items()} == {"on_time": 5000, "late": 50, "too_late": 10, "invalid": 15}
    age = {k: [now + 9.75 - datetime.fromisoformat(e["started_at"]).timestamp() for e in got[k]]
           for k in ("on_time", "late", "too_late")}
    assert all(-0.25 <= a <= 10.0 for a in age["on_time"])
    assert all(2 * 3600 - 10 <= a <= 3 * 3600 for a in age["late"])
    assert all(8 * 86400 <= a <= 8 * 86400 + 3600 for a in age["too_late"])
    ids = [e["trace_id"] for k in ("on_time", "late", "too_late") for e in got[k]]
    assert len(set(ids)) == len(ids)


def test_invalid_messages_each_have_their_reason():
    from stream_agg.ops.demo import invalid_reasons

    assert invalid_reasons() == ["not_json", "missing_field:operation_type", "negative:duration_ms",
                                 "not_finite:duration_ms"]


def test_view_rows_per_operation_type_and_model():
    from stream_agg.ops.demo import view_rows
    from stream_agg.store.query_sql import BucketRow

    rows = [
        BucketRow("trace.duration_ms", "operation_type", "chat", 10, 1000.0, 100.0, 180.0, 199.0),
        BucketRow("trace.errors", "operation_type", "chat", 10, 2.0, 0.2, None, None),
        BucketRow("trace.total_tokens", "operation_type", "chat", 8, 4000.0, 500.0, None, None),
        BucketRow("trace.duration_ms", "operation_type", "search", 30, 900.0, 30.0, 50.0, 60.0),
        BucketRow("trace.duration_ms", "all", "all", 40, 1900.0, 47.5, 170.0, 198.0),
        BucketRow("trace.errors", "all", "all", 40, 2.0, 0.05, None, None),
        BucketRow("llm.duration_ms", "model", "m1", 5, 50.0, 10.0, 19.0, 20.0),
        BucketRow("llm.input_tokens", "model", "m1", 5, 700.0, 140.0, None, None),
        BucketRow("llm.output_tokens", "model", "m1", 4, 90.0, 22.5, None, None),
    ]
    ops, models = view_rows(rows)
    assert [(r.name, r.count, r.error_rate, r.avg_ms, r.p95_ms, r.p99_ms, r.tokens) for r in ops] == [
        ("search", 30, None, 30.0, 50.0, 60.0, None),
        ("chat", 10, 0.2, 100.0, 180.0, 199.0, 4000.0),
        ("all", 40, 0.05, 47.5, 170.0, 198.0, None),
    ]
    assert [(r.name, r.count, r.avg_ms, r.tokens, r.output_tokens) for r in models] == [("m1", 5, 10.0, 700.0, 90.0)]
