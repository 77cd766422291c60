"""The deployment files hold together: docker-compose.yml serves port 8000 with a readiness health
check, and its `monitoring` profile wires Prometheus to the service and Grafana to Prometheus, with
a dashboard whose queries name metrics and labels the running service really exports.

Prometheus and Grafana images cannot be pulled on the build machines, so their configuration is
checked here rather than run.
"""
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.service_fixtures import unavailable

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "cnn-serve.json"
READY_TIMEOUT_S = 180


def load_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def with_defaults(value: str) -> str:
    """Expand `${VAR:-default}` the way compose does when VAR is unset."""
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", value)


@pytest.fixture(scope="module")
def compose() -> dict:
    return load_yaml(ROOT / "docker-compose.yml")


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def queries(dashboard: dict) -> list[str]:
    return [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


def mounted(service: dict, target: str) -> Path:
    """The repository path a compose service mounts at `target`."""
    for volume in service["volumes"]:
        source, dest, *_ = volume.split(":")
        if dest == target:
            return ROOT / source
    raise AssertionError(f"nothing mounted at {target}")


def test_docker_compose_accepts_the_file_with_the_monitoring_profile():
    if shutil.which("docker-compose"):
        command = ["docker-compose"]
    elif shutil.which("docker"):
        command = ["docker", "compose"]
    else:
        unavailable("docker-compose is not installed: it validates docker-compose.yml")
    result = subprocess.run([*command, "-f", "docker-compose.yml", "--profile", "monitoring", "config", "-q"],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_the_service_listens_on_8000_checks_readiness_and_restarts(compose):
    service = compose["services"]["cnn-serve"]

    assert service["build"]["context"] == "."
    assert [with_defaults(p) for p in service["ports"]] == ["127.0.0.1:8000:8000"]
    assert "/health/ready" in " ".join(service["healthcheck"]["test"])
    assert service["restart"] == "unless-stopped"
    assert "profiles" not in service  # plain `docker compose up` starts it


def test_prometheus_scrapes_the_services_metrics_endpoint(compose):
    prometheus = compose["services"]["prometheus"]
    config = load_yaml(mounted(prometheus, "/etc/prometheus/prometheus.yml"))

    assert prometheus["profiles"] == ["monitoring"]
    [job] = config["scrape_configs"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert job["static_configs"][0]["targets"] == ["cnn-serve:8000"]
    assert "cnn-serve" in compose["services"]


def test_grafana_is_provisioned_with_prometheus_and_the_dashboard(compose, dashboard):
    grafana = compose["services"]["grafana"]
    provisioning = mounted(grafana, "/etc/grafana/provisioning")
    [datasource] = load_yaml(provisioning / "datasources" / "prometheus.yml")["datasources"]
    [provider] = load_yaml(provisioning / "dashboards" / "cnn-serve.yml")["providers"]

    assert grafana["profiles"] == ["monitoring"]
    assert datasource["url"] == "http://prometheus:9090" and "prometheus" in compose["services"]
    dashboards = mounted(grafana, provider["options"]["path"])
    assert (dashboards / DASHBOARD.name).read_text() == DASHBOARD.read_text()
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == datasource["uid"], panel["title"]


def test_the_dashboard_compares_p50_p95_p99_and_throughput_per_model(dashboard):
    exprs = queries(dashboard)
    for quantile in ("0.5", "0.95", "0.99"):
        assert any(e.startswith(f"histogram_quantile({quantile}, sum by (le, model)") for e in exprs), quantile
    assert any(e.startswith("sum by (model) (rate(") and "_total" in e for e in exprs)


@pytest.fixture(scope="module")
def exported_series(model_repository, photos) -> dict[str, list[dict[str, str]]]:
    """Sample name -> label sets, scraped from a real service after one photo per model."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MODEL_REPOSITORY": str(model_repository), "HOST": "127.0.0.1", "PORT": str(port)}
    server = subprocess.Popen([sys.executable, "-m", "service"], cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            assert server.poll() is None, "the service exited"
            try:
                if httpx.get(f"{url}/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the service never became ready"
            time.sleep(0.5)
        for model in httpx.get(f"{url}/models", timeout=10).json()["models"]:
            with photos["chelsea"].open("rb") as f:
                httpx.post(f"{url}/predict/{model['name']}", files={"file": f}, timeout=60).raise_for_status()
        text = httpx.get(f"{url}/metrics", timeout=10).text
    finally:
        server.terminate()
        server.wait(timeout=30)
    series: dict[str, list[dict[str, str]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            series.setdefault(sample.name, []).append(sample.labels)
    return series


SELECTOR = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\{([^}]*)\}")
MATCHER = re.compile(r'(\w+)\s*(=~|!~|!=|=)\s*"([^"]*)"')
GROUPING = re.compile(r"\bby \(([^)]*)\)")


def test_the_dashboard_queries_name_series_the_service_exports(dashboard, exported_series):
    for expr in queries(dashboard):
        selectors = SELECTOR.findall(expr)
        assert selectors, f"no metric selector in {expr}"
        for name, matchers in selectors:
            assert name in exported_series, f"{name} is not exported (query: {expr})"
            labels = exported_series[name]
            for label, op, value in MATCHER.findall(matchers):
                assert any(label in s for s in labels), f"{name} has no label {label!r}"
                if op in ("=", "=~"):
                    assert any(re.fullmatch(value, s.get(label, "")) for s in labels), \
                        f"no {name} series with {label}{op}{value!r}"
            for group in GROUPING.findall(expr):
                for label in (g.strip() for g in group.split(",")):
                    assert any(label in s for s in labels), f"{name} has no label {label!r} to group by"


def test_every_service_setting_can_be_passed_through_compose(compose):
    from service.settings import Settings

    fixed_by_the_image = {"MODEL_REPOSITORY", "HOST", "PORT"}
    settings = {name.upper() for name in Settings.model_fields} - fixed_by_the_image
    assert set(compose["services"]["cnn-serve"]["environment"]) == settings
