"""docker-compose.yml stays consistent with the settings and the Prometheus config."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from stream_agg.config import SETTINGS

REPO = Path(__file__).resolve().parents[2]
BY_ENV = {s.env: s for s in SETTINGS}


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def prometheus() -> dict:
    return yaml.safe_load((REPO / "deploy/prometheus/prometheus.yml").read_text())


def _env(service: dict) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):  # the "- NAME=value" form
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def test_the_expected_services_exist(compose):
    services = compose["services"]
    assert {"kafka", "postgres", "migrate", "worker", "prometheus"} <= set(services)
    assert services["kafka"]["image"] == "apache/kafka:3.8.0"
    assert services["postgres"]["image"].startswith("postgres:16")
    assert services["migrate"]["command"] == ["migrate"]
    assert services["worker"]["command"] == ["worker"]


def test_every_stream_agg_variable_is_a_real_setting_with_a_valid_value(compose):
    seen = 0
    for name, service in compose["services"].items():
        for key, value in _env(service).items():
            if not key.startswith("STREAM_AGG_"):
                continue
            seen += 1
            assert key in BY_ENV, f"{name}: {key} is not a setting"
            BY_ENV[key].parse(value)  # raises on a value the program would reject
    assert seen >= 4


def test_worker_metrics_port_is_exposed_and_scraped(compose, prometheus):
    worker = compose["services"]["worker"]
    port = int(_env(worker)["STREAM_AGG_METRICS_PORT"])
    assert port == 9108
    assert str(port) in [str(p) for p in worker["expose"]]
    assert f"{port}:{port}" in worker["ports"]
    jobs = {job["job_name"]: job for job in prometheus["scrape_configs"]}
    job = jobs["stream-agg"]
    targets = [t for conf in job["static_configs"] for t in conf["targets"]]
    assert targets == [f"worker:{port}"]
    assert job.get("scrape_interval", prometheus["global"]["scrape_interval"]) == "15s"
    assert prometheus["rule_files"] == ["alerts.yml"]


def test_prometheus_mounts_its_config_and_rules(compose):
    volumes = compose["services"]["prometheus"]["volumes"]
    assert "./deploy/prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in volumes
    assert "./deploy/prometheus/alerts.yml:/etc/prometheus/alerts.yml:ro" in volumes


def test_kafka_advertises_what_the_worker_bootstraps_from(compose):
    kafka_env = _env(compose["services"]["kafka"])
    advertised = dict(
        listener.split("://", 1) for listener in kafka_env["KAFKA_ADVERTISED_LISTENERS"].split(",")
    )
    worker_bootstrap = _env(compose["services"]["worker"])["STREAM_AGG_KAFKA_BOOTSTRAP"]
    assert advertised["PLAINTEXT"] == worker_bootstrap == "kafka:9092"
    assert "PLAINTEXT://:9092" in kafka_env["KAFKA_LISTENERS"].split(",")
    assert kafka_env["KAFKA_PROCESS_ROLES"] == "broker,controller"


def test_worker_starts_after_its_dependencies(compose):
    depends = compose["services"]["worker"]["depends_on"]
    assert depends["kafka"]["condition"] == "service_healthy"
    assert depends["postgres"]["condition"] == "service_healthy"
    assert depends["migrate"]["condition"] == "service_completed_successfully"
    for name in ("kafka", "postgres"):
        assert compose["services"][name]["healthcheck"]["test"]


def test_database_urls_point_at_the_compose_postgres(compose):
    pg = _env(compose["services"]["postgres"])
    expected = (f"postgresql://{pg['POSTGRES_USER']}:{pg['POSTGRES_PASSWORD']}"
                f"@postgres:5432/{pg['POSTGRES_DB']}")
    for name in ("migrate", "worker"):
        assert _env(compose["services"][name])["STREAM_AGG_DATABASE_URL"] == expected
