"""deploy/prometheus: promtool accepts the config and the rules, and each alert fires when it should.

The alert scenarios run through `promtool test rules`, Prometheus's own rule evaluator, on
synthetic series shaped like the worker's; a healthy worker must raise nothing.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"
PROMTOOL = shutil.which("promtool")
pytestmark = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (Debian package `prometheus`; "
                                                          ".ci/run installs it)")
W = {"job": "stream-agg", "instance": "w1:9108"}
EXPECTED_ALERTS = {
    "StreamAggWorkerDown", "StreamAggConsumerLagGrowing", "StreamAggNoSuccessfulFlush", "StreamAggFlushFailures",
    "StreamAggDatabaseDown", "StreamAggDLQRateHigh", "StreamAggWatermarkStuck", "StreamAggConsumptionPaused",
    "StreamAggReconcileLate",
}


def promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=60)


def series(name: str, values: str, **labels: str) -> dict[str, str]:
    body = ", ".join(f'{k}="{v}"' for k, v in {**W, **labels}.items())
    return {"series": f"{name}{{{body}}}", "values": values}


def firing(eval_time: str, *alerts: tuple[str, str, dict[str, str]]) -> dict:
    """ALERTS{alertstate="firing"} at `eval_time` must be exactly these (name, severity, labels)."""
    samples = []
    for name, severity, labels in alerts:
        body = ", ".join(f'{k}="{v}"' for k, v in {"alertname": name, "alertstate": "firing",
                                                    "severity": severity, **labels}.items())
        samples.append({"labels": f"ALERTS{{{body}}}", "value": 1})
    return {"expr": 'ALERTS{alertstate="firing"}', "eval_time": eval_time, "exp_samples": samples}


INSTANCE = {"instance": W["instance"]}

HEALTHY = [
    series("up", "1x60"),
    series("observability_aggregation_last_success", "0+60x60", exported_job="stream"),  # keeps up with time()
    series("stream_agg_pending_events", "800x60"),
    series("stream_agg_consumer_lag_messages", "40x60", partition="0"),
    series("stream_agg_flush_failures_total", "0x60"),
    series("stream_agg_database_up", "1x60"),
    series("stream_agg_events_consumed_total", "0+60000x60"),
    series("stream_agg_messages_consumed_total", "0+120x60"),
    series("stream_agg_dlq_messages_total", "0+30x60"),  # 0.05% of events
    series("stream_agg_watermark_timestamp_seconds", "0+60x60", partition="0"),
    series("stream_agg_consumption_paused", "0x60"),
]

SCENARIOS = [
    # A healthy, busy worker raises nothing.
    {"input_series": HEALTHY, "promql_expr_test": [firing("10m"), firing("55m")]},
    {"input_series": [series("up", "0x10")],
     "promql_expr_test": [firing("1m"), firing("5m", ("StreamAggWorkerDown", "critical", W))]},
    # Lag high and growing for 15 minutes fires; high but flat does not.
    {"input_series": [series("stream_agg_consumer_lag_messages", "1000+100x60", partition="0"),
                      series("stream_agg_consumer_lag_messages", "5000x60", partition="1", instance="w2:9108")],
     "promql_expr_test": [firing("10m"),
                          firing("40m", ("StreamAggConsumerLagGrowing", "warning", INSTANCE))]},
    # No flush for 10 min while events wait: fires (both label layouts); nothing pending: does not.
    {"input_series": [series("observability_aggregation_last_success", "0x30", exported_job="stream"),
                      series("stream_agg_pending_events", "5x30"),
                      series("observability_aggregation_last_success", "0x30", job="stream", instance="w2:9108"),
                      series("stream_agg_pending_events", "5x30", instance="w2:9108"),
                      series("observability_aggregation_last_success", "0x30", exported_job="stream",
                             instance="w3:9108"),
                      series("stream_agg_pending_events", "0x30", instance="w3:9108")],
     "promql_expr_test": [firing("9m"),
                          firing("15m", ("StreamAggNoSuccessfulFlush", "critical", INSTANCE),
                                 ("StreamAggNoSuccessfulFlush", "critical", {"instance": "w2:9108"}))]},
    {"input_series": [series("stream_agg_flush_failures_total", "0+1x30")],
     "promql_expr_test": [firing("3m"), firing("15m", ("StreamAggFlushFailures", "warning", W))]},
    {"input_series": [series("stream_agg_database_up", "1 1 0x10")],
     "promql_expr_test": [firing("3m"), firing("6m", ("StreamAggDatabaseDown", "critical", W))]},
    # 2% of events dead-lettered for 20 minutes.
    {"input_series": [series("stream_agg_events_consumed_total", "0+1000x40"),
                      series("stream_agg_dlq_messages_total", "0+20x40")],
     "promql_expr_test": [firing("5m"), firing("30m", ("StreamAggDLQRateHigh", "warning", INSTANCE))]},
    # Messages keep coming but partition 2's watermark never moves; partition 0's does.
    {"input_series": [series("stream_agg_watermark_timestamp_seconds", "1000x40", partition="2"),
                      series("stream_agg_watermark_timestamp_seconds", "1000+60x40", partition="0"),
                      series("stream_agg_messages_consumed_total", "0+10x40")],
     "promql_expr_test": [firing("10m"), firing("18m"),  # a young series is not "stuck for 15 min" yet
                          firing("30m", ("StreamAggWatermarkStuck", "warning", {**W, "partition": "2"}))]},
    {"input_series": [series("stream_agg_consumption_paused", "1x10")],
     "promql_expr_test": [firing("7m", ("StreamAggConsumptionPaused", "warning", W))]},
    {"input_series": [series("observability_aggregation_last_success", "0x300", exported_job="reconcile",
                             job="reconcile-job")],
     "promql_expr_test": [firing("2h"),
                          firing("4h", ("StreamAggReconcileLate", "warning",
                                        {"job": "reconcile-job", "instance": W["instance"],
                                         "exported_job": "reconcile"}))]},
]


@pytest.fixture
def deploy_copy(tmp_path: Path) -> Path:
    for name in ("prometheus.yml", "alerts.yml"):
        shutil.copy(DEPLOY / name, tmp_path / name)
    return tmp_path


def test_promtool_check_config(deploy_copy: Path) -> None:
    res = promtool("check", "config", "prometheus.yml", cwd=deploy_copy)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SUCCESS: 9 rules found" in res.stdout + res.stderr


def test_promtool_check_rules(deploy_copy: Path) -> None:
    res = promtool("check", "rules", "alerts.yml", cwd=deploy_copy)
    assert res.returncode == 0, res.stdout + res.stderr


def test_every_alert_is_documented_and_graded() -> None:
    groups = yaml.safe_load((DEPLOY / "alerts.yml").read_text())["groups"]
    rules = [r for g in groups for r in g["rules"]]
    assert {r["alert"] for r in rules} == EXPECTED_ALERTS
    for r in rules:
        assert r["labels"]["severity"] in ("critical", "warning"), r["alert"]
        assert r["annotations"]["summary"] and len(r["annotations"]["description"]) > 80, r["alert"]


def test_alerts_fire_exactly_when_they_should(deploy_copy: Path) -> None:
    spec = {"rule_files": ["alerts.yml"], "evaluation_interval": "1m",
            "tests": [{"interval": "1m", **s} for s in SCENARIOS]}
    (deploy_copy / "alerts_test.yml").write_text(yaml.safe_dump(spec, sort_keys=False))
    res = promtool("test", "rules", "alerts_test.yml", cwd=deploy_copy)
    assert res.returncode == 0, res.stdout + res.stderr
