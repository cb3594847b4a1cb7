"""A real Prometheus server scrapes a real worker: its series arrive with the right values, the rules load."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml
from helpers import make_events
from worker_support import WorkerProcess, produce, produce_raw, wait_caught_up

from stream_agg.config import Config
from stream_agg.devstack import free_port
from stream_agg.ops.demo import parse_worker_metrics

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = shutil.which("prometheus")
pytestmark = pytest.mark.skipif(PROMETHEUS is None, reason="prometheus server binary not installed (Debian "
                                                            "package `prometheus`; .ci/run installs it)")
# Invalid messages from the contract's examples; the file name is the reason the worker must give.
INVALID = ("not_json.json", "negative__duration_ms.json", "not_finite__duration_ms.json")


class Prometheus:
    """`prometheus` on a free loopback port with its own config and data dir; stopped by PID."""

    def __init__(self, workdir: Path, target: str) -> None:
        shutil.copy(ROOT / "deploy" / "prometheus" / "alerts.yml", workdir / "alerts.yml")
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": ["alerts.yml"],
            "scrape_configs": [{"job_name": "stream-agg", "static_configs": [{"targets": [target]}]}],
        }
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = workdir / "prometheus.log"
        assert PROMETHEUS is not None
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [PROMETHEUS, f"--config.file={workdir / 'prometheus.yml'}", f"--storage.tsdb.path={workdir / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while not self._ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"prometheus did not start:\n{self.log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.2)

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as resp:
                return resp.status == 200
        except OSError:
            return False

    def api(self, path: str, **params: str) -> dict:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}{query}", timeout=5) as resp:
            body = json.load(resp)
        assert body["status"] == "success", body
        return body["data"]

    def values(self, promql: str) -> dict[tuple[tuple[str, str], ...], float]:
        """Instant query -> {labels (minus job/instance): value}."""
        out = {}
        for r in self.api("query", query=promql)["result"]:
            labels = tuple(sorted((k, v) for k, v in r["metric"].items() if k not in ("job", "instance")))
            out[labels] = float(r["value"][1])
        return out

    def one(self, promql: str) -> float | None:
        vals = self.values(promql)
        assert len(vals) <= 1, vals
        return next(iter(vals.values()), None)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def test_prometheus_scrapes_the_worker_and_loads_the_alert_rules(config: Config, tmp_path: Path) -> None:
    cfg = config.with_overrides(group_id=f"g-{config.topic}")
    metrics_port = free_port()
    worker = WorkerProcess(cfg, tmp_path / "worker.log", STREAM_AGG_METRICS_PORT=str(metrics_port)).start()
    prom = Prometheus(tmp_path, f"127.0.0.1:{metrics_port}")
    try:
        events = make_events(3000, seed=9, hours=3)
        produce(cfg, events)
        examples = ROOT / "schemas" / "examples" / "invalid"
        produce_raw(cfg, [(examples / name).read_bytes() for name in INVALID])
        wait_caught_up(cfg, timeout=120, workers=[worker])
        flushed_at = time.time()

        # Prometheus holds what happened, scraped over HTTP from the worker: wait for a scrape
        # taken after the flush that made every event durable.
        deadline = time.monotonic() + 30
        while prom.one('observability_aggregation_records_processed_total{exported_job="stream"}') != len(events):
            assert time.monotonic() < deadline, prom.values("observability_aggregation_records_processed_total")
            time.sleep(0.5)
        assert prom.one('stream_agg_events_consumed_total{job="stream-agg"}') == len(events) + len(INVALID)
        assert prom.one('up{job="stream-agg"}') == 1
        reasons = {dict(k)["reason"]: v for k, v in prom.values("stream_agg_events_invalid_total").items()}
        assert reasons == {name.removesuffix(".json").replace("__", ":"): 1.0 for name in INVALID}
        assert prom.one("stream_agg_dlq_messages_total") == len(INVALID)
        assert prom.one("stream_agg_assigned_partitions") == 4
        assert prom.one("stream_agg_database_up") == 1
        # The worker's own job label is kept as exported_job (the scrape job owns `job`).
        last = prom.one('observability_aggregation_last_success{exported_job="stream"}')
        assert last is not None and flushed_at - 30 < last <= time.time()
        assert (prom.one('observability_aggregation_duration_seconds_count{exported_job="stream"}') or 0) >= 1

        # Counters are idle now: Prometheus's latest sample equals the endpoint itself.
        time.sleep(2.5)
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as resp:
            direct = parse_worker_metrics(resp.read().decode())
        assert prom.one("stream_agg_rows_upserted_total") == direct.rows_upserted > 0
        assert prom.one("stream_agg_events_late_total") == direct.late

        # Every alert rule loaded and evaluates cleanly; a healthy worker raises none.
        rules = [r for g in prom.api("rules")["groups"] for r in g["rules"]]
        assert len(rules) == 9 and all(r["health"] == "ok" for r in rules), rules
        assert [a for a in prom.api("alerts")["alerts"] if a["state"] == "firing"] == []
    finally:
        prom.stop()
        assert prom.proc.returncode == 0, prom.log.read_text(errors="replace")[-2000:]
        if worker.alive():
            worker.terminate()
        worker.kill()
