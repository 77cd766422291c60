"""The deployment files hold together, and the monitoring runs for real.

docker-compose.yml serves port 8000 with a readiness health check; its `monitoring` profile wires
Prometheus, with the alert rules, to the service and Grafana to Prometheus. Prometheus itself runs
here: Debian's binary scrapes a real service with the project's own configuration, rewritten only
where a test must be quick (the target, a 1 s scrape and evaluation interval, and every alert's
`for:` set to zero in a copy of the rules); then every query of the Grafana dashboard and every
rule is evaluated through its HTTP API, and alerts are made to fire. `promtool` checks the
configuration, the rules, their unit tests and the service's /metrics.

Grafana cannot run here (no image can be pulled and Debian has no package): its dashboard JSON is
checked and its queries are run in Prometheus, not in Grafana.
"""
import contextlib
import json
import math
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import httpx
import pytest
import yaml
from conftest import report
from prometheus_client.parser import text_string_to_metric_families

from bench.servers import ServerProcess, answers_200, running, wait_for
from service.metrics import memory_limit_bytes
from tests.service_fixtures import copy_repository, required_tool, running_server, unavailable

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "cnn-serve.json"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
ALERT_TESTS = DEPLOY / "prometheus" / "alerts.test.yml"
ALERTED_STATUSES = ("200", "500", "503", "504")


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
    # HTTP, and the Open Inference Protocol over gRPC on GRPC_PORT's default; loopback unless asked.
    assert [with_defaults(p) for p in service["ports"]] == ["127.0.0.1:8000:8000", "127.0.0.1:8001:8001"]
    # On the admin listener, which clients holding every connection of 8000 cannot starve.
    assert "127.0.0.1:8002/health/ready" in " ".join(service["healthcheck"]["test"])
    assert service["restart"] == "unless-stopped"
    assert "profiles" not in service  # plain `docker compose up` starts it


def test_prometheus_scrapes_the_services_metrics_endpoint_with_the_alerts(compose):
    prometheus = compose["services"]["prometheus"]
    config = load_yaml(mounted(prometheus, "/etc/prometheus/prometheus.yml"))

    assert prometheus["profiles"] == ["monitoring"]
    [job] = config["scrape_configs"]
    assert job["job_name"] == "cnn-serve"  # the job CnnServeDown watches
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert job["static_configs"][0]["targets"] == ["cnn-serve:8002"]  # the admin listener
    assert "cnn-serve" in compose["services"]
    [rules] = config["rule_files"]
    assert mounted(prometheus, f"/etc/prometheus/{rules}").read_text() == ALERTS.read_text()


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


# Prometheus, for real ------------------------------------------------------------------------------
SCRAPE_INTERVAL = "1s"
# Grafana fills $__rate_interval from the scrape interval and the panel's width; here a window
# longer than the whole test, so every request of it is in each query.
RATE_INTERVAL = "5m"
OVERLOADED = "mobilenetv1"  # the slowest model: the overload keeps its slots busy longest
BROKEN = "broken"  # a copy of another model's folder: its metadata names that model, so it fails
MAX_IN_FLIGHT = 2
OVERLOAD_CLIENTS = 16
REQUESTS_PER_MODEL = 5
T = TypeVar("T")


def eventually(check: Callable[[], T], timeout: float, what: str) -> T:
    """`check()` once it returns something true; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, f"{what}: not after {timeout:.0f} s"
        time.sleep(0.2)
    return value


def prometheus_files(folder: Path, target: str) -> Path:
    """The project's Prometheus configuration scraping `target` every second, and beside it a copy
    of the alerts with every `for:` at zero, so an alert fires at the first evaluation that meets
    its condition. Nothing else changes."""
    config = load_yaml(PROMETHEUS_CONFIG)
    config["global"].update(scrape_interval=SCRAPE_INTERVAL, evaluation_interval=SCRAPE_INTERVAL)
    [job] = config["scrape_configs"]
    job["static_configs"] = [{"targets": [target]}]
    alerts = load_yaml(ALERTS)
    for rule in (r for group in alerts["groups"] for r in group["rules"] if "alert" in r):
        rule["for"] = "0s"
    [rules] = config["rule_files"]
    (folder / rules).write_text(yaml.safe_dump(alerts))
    (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
    return folder / "prometheus.yml"


def prometheus_command(binary: str, config: Path) -> list[str]:
    # ServerProcess hands the free port over as $HOST and $PORT; Prometheus takes it as a flag.
    return ["sh", "-c", 'exec "$@" --web.listen-address="$HOST:$PORT"', "prometheus", binary,
            f"--config.file={config}", f"--storage.tsdb.path={config.parent / 'tsdb'}", "--log.level=warn"]


@dataclass
class Monitoring:
    """A service and Prometheus scraping it, after one photo per request to every model and an
    overload of one of them."""

    service: ServerProcess
    prometheus: ServerProcess
    models: list[str]  # the models that loaded
    scraped_at_start: dict[str, list[dict]]  # status -> cnn_serve_requests_total series, first scrape
    shed: int  # overload 503s
    firing: set[tuple[str, str]]  # (alertname, model) firing once the awaited alerts fired

    def query(self, expr: str) -> list[dict]:
        reply = httpx.get(f"{self.prometheus.url}/api/v1/query", params={"query": expr}, timeout=10,
                          trust_env=False).json()
        assert reply["status"] == "success", f"{expr}: {reply.get('error')}"
        return reply["data"]["result"]

    def alerts(self) -> set[tuple[str, str]]:
        reply = httpx.get(f"{self.prometheus.url}/api/v1/alerts", timeout=10, trust_env=False).json()
        return {(a["labels"]["alertname"], a["labels"].get("model", "")) for a in reply["data"]["alerts"]
                if a["state"] == "firing"}

    def alerts_once_firing(self, awaited: set[tuple[str, str]], timeout: float) -> set[tuple[str, str]]:
        """The alerts firing once all of `awaited` fire, or after `timeout` seconds (the tests
        then say which did not)."""
        deadline = time.monotonic() + timeout
        while not (firing := self.alerts()) >= awaited and time.monotonic() < deadline:
            time.sleep(0.2)
        return firing


def overload(url: str, image: bytes) -> list[int]:
    def predict(_: int) -> int:
        return httpx.put(f"{url}/predict/{OVERLOADED}", content=image, timeout=60, trust_env=False).status_code

    with ThreadPoolExecutor(OVERLOAD_CLIENTS) as pool:
        return list(pool.map(predict, range(4 * OVERLOAD_CLIENTS)))


@pytest.fixture(scope="module")
def monitoring(model_repository, photos, tmp_path_factory, request) -> Iterator[Monitoring]:
    binary = required_tool("prometheus")
    folder = tmp_path_factory.mktemp("monitoring")
    repository = copy_repository(model_repository, folder / "repository")
    shutil.copytree(repository / "effnet", repository / BROKEN)
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        service = stack.enter_context(running_server(
            repository, folder / "service.log", MAX_IN_FLIGHT_PER_MODEL=str(MAX_IN_FLIGHT),
            STRICT_READINESS="false"))  # ready with the broken model failed
        service.wait_ready()
        readiness = httpx.get(service.url + "/health/ready", trust_env=False).json()
        models = sorted(m for m, status in readiness["models"].items() if status == "ready")
        assert readiness["failed"].keys() == {BROKEN}, readiness
        assert models == sorted(p.name for p in model_repository.iterdir()), readiness

        config = prometheus_files(folder, f"{service.host}:{service.port}")
        prometheus = stack.enter_context(running(prometheus_command(binary, config), folder / "prometheus.log"))
        wait_for(prometheus.host, prometheus.port, "/-/ready", answers_200, 60, prometheus)
        monitoring = Monitoring(service, prometheus, models, {}, 0, set())
        eventually(lambda: monitoring.query('up{job="cnn-serve"} == 1'), 30, "a first scrape")
        monitoring.scraped_at_start = {status: monitoring.query(f'cnn_serve_requests_total{{status="{status}"}}')
                                       for status in ALERTED_STATUSES}
        prepared = time.perf_counter()

        image = photos["chelsea"].read_bytes()
        for model in models:
            for _ in range(REQUESTS_PER_MODEL):
                assert httpx.put(f"{service.url}/predict/{model}", content=image, timeout=60,
                                 trust_env=False).status_code == 200
        statuses = overload(service.url, image)
        assert set(statuses) <= {200, 503}, statuses
        monitoring.shed = statuses.count(503)
        sent = time.perf_counter()

        monitoring.firing = monitoring.alerts_once_firing(
            {("CnnServeShedding", OVERLOADED), ("CnnServeModelNotReady", BROKEN)}, timeout=60)
        report(request, "prometheus", f"service ready and scraped in {prepared - started:.1f} s; "
               f"traffic {sent - prepared:.1f} s ({monitoring.shed} of {len(statuses)} overload "
               f"requests shed); alerts awaited {time.perf_counter() - sent:.1f} s; "
               f"firing: {sorted(monitoring.firing)}")
        yield monitoring


def test_the_series_the_alerts_divide_by_are_scraped_at_zero_before_any_request(monitoring):
    for status, series in monitoring.scraped_at_start.items():
        values = {s["metric"]["model"]: float(s["value"][1]) for s in series}
        assert values == {model: 0.0 for model in [*monitoring.models, BROKEN]}, status


def test_every_dashboard_query_returns_a_series_for_every_model(monitoring, dashboard):
    for expr in queries(dashboard):
        filled = expr.replace("$__rate_interval", RATE_INTERVAL)
        assert "$" not in filled, f"a Grafana variable this test does not fill: {expr}"
        values = {s["metric"].get("model"): float(s["value"][1]) for s in monitoring.query(filled)}
        missing = set(monitoring.models) - set(values)
        assert not missing, f"no series for {sorted(missing)}: {filled}"
        assert all(math.isfinite(values[m]) and values[m] >= 0 for m in monitoring.models), (filled, values)


def test_every_rule_evaluates_and_each_ratio_is_recorded_for_every_model(monitoring):
    for group in load_yaml(ALERTS)["groups"]:
        for rule in group["rules"]:
            monitoring.query(rule["expr"])  # fails on an error
            if "record" not in rule:
                continue
            recorded = monitoring.query(rule["record"])  # evaluated by Prometheus, from the rule file
            if rule["record"].startswith("model:"):
                models = {s["metric"]["model"] for s in recorded}
                assert set(monitoring.models) <= models, f"{rule['record']} lacks {set(monitoring.models) - models}"
            else:
                assert recorded, rule["record"]


def test_overload_fires_the_503_alert_and_a_model_that_failed_to_load_fires_not_ready(monitoring):
    assert monitoring.shed > 0
    assert {m for name, m in monitoring.firing if name == "CnnServeShedding"} == {OVERLOADED}
    assert {m for name, m in monitoring.firing if name == "CnnServeModelNotReady"} == {BROKEN}
    assert not {m for name, m in monitoring.firing if name == "CnnServeErrorsHigh"}, "a 503 is no error"


def test_promtool_accepts_the_services_metrics(monitoring):
    text = httpx.get(monitoring.service.url + "/metrics", trust_env=False).text
    checked = subprocess.run([required_tool("promtool"), "check", "metrics"], input=text,
                             capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_promtool_accepts_the_configuration_and_the_rules_pass_their_unit_tests():
    promtool = required_tool("promtool")
    for command in (["check", "config", PROMETHEUS_CONFIG], ["check", "rules", ALERTS],
                    ["test", "rules", ALERT_TESTS]):
        checked = subprocess.run([promtool, *map(str, command)], capture_output=True, text=True, timeout=60)
        assert checked.returncode == 0, checked.stdout + checked.stderr


def test_every_alert_says_how_severe_and_what_happened():
    alerts = [r for group in load_yaml(ALERTS)["groups"] for r in group["rules"] if "alert" in r]
    assert {a["alert"] for a in alerts} >= {"CnnServeLatencyHigh", "CnnServeErrorsHigh", "CnnServeShedding",
                                            "CnnServeModelNotReady", "CnnServeMemoryNearLimit"}
    for alert in alerts:
        assert alert["labels"]["severity"] in ("warning", "critical"), alert["alert"]
        assert alert["annotations"]["summary"] and alert["annotations"]["description"], alert["alert"]
        assert alert.get("for"), f"{alert['alert']} would fire on one evaluation"


def test_a_model_is_in_metrics_as_loading_with_its_alert_series_from_start_up(model_repository, tmp_path):
    # Enough warm-up runs that the model is still loading when the listener answers.
    repository = copy_repository(model_repository, tmp_path / "repository", "mobilenetv3_small")
    with running_server(repository, tmp_path / "service.log", WARMUP_RUNS="300") as server:
        server.wait_live()
        loading = scraped(server.url)
        server.wait_ready()
        ready = scraped(server.url)
    for samples in (loading, ready):
        assert {labels["status"]: value for name, labels, value in samples
                if name == "cnn_serve_requests_total"} == {status: 0.0 for status in ALERTED_STATUSES}
    assert [labels["status"] for name, labels, _ in loading if name == "cnn_serve_model_info"] == ["loading"]
    assert [labels["status"] for name, labels, _ in ready if name == "cnn_serve_model_info"] == ["ready"]


def test_the_memory_alert_divides_by_the_cgroups_limit_and_by_infinity_without_one(tmp_path):
    v2, v1 = tmp_path / "memory.max", tmp_path / "memory.limit_in_bytes"
    v2.write_text("1073741824\n")
    assert memory_limit_bytes([v2, v1]) == 1073741824
    v2.write_text("max\n")  # cgroup v2 without a limit
    assert memory_limit_bytes([v2, v1]) == math.inf
    v1.write_text("9223372036854771712\n")  # cgroup v1 without a limit
    assert memory_limit_bytes([tmp_path / "absent", v1]) == math.inf
    v1.write_text("536870912\n")
    assert memory_limit_bytes([tmp_path / "absent", v1]) == 536870912
    assert memory_limit_bytes([tmp_path / "absent"]) == math.inf


def scraped(url: str) -> list[tuple[str, dict[str, str], float]]:
    text = httpx.get(url + "/metrics", trust_env=False).text
    return [(s.name, s.labels, s.value) for family in text_string_to_metric_families(text)
            for s in family.samples]


def test_every_service_setting_can_be_passed_through_compose(compose):
    from service.settings import Settings

    # The healthcheck and the Prometheus target name ADMIN_PORT's default; the ports published
    # name PORT's and GRPC_PORT's.
    fixed_by_the_image = {"MODEL_REPOSITORY", "HOST", "PORT", "ADMIN_PORT", "GRPC_PORT"}
    settings = {name.upper() for name in Settings.model_fields} - fixed_by_the_image
    passed = set(compose["services"]["cnn-serve"]["environment"])
    # OpenTelemetry's own variables pass through too (docs/operations.md, tracing).
    assert {name for name in passed if not name.startswith("OTEL_")} == settings
