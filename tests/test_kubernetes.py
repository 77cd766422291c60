"""The Kubernetes manifests (deploy/kubernetes) hold together, checked offline: every variant builds
with kubectl's kustomize; every object it builds validates against the API schema of Kubernetes
1.30 and of the newest release kubernetes-validate knows; the custom resources (KServe, the
Prometheus operator) are checked structurally, their pod parts against the core schema; and the
settings that keep a pod hardened, probed, sized and drained are pinned here.

No cluster runs here: what a controller does with these objects is not tested.
"""
import re
import subprocess
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from service.app import create_app
from service.metrics import Metrics
from service.settings import Settings
from tests.service_fixtures import required_tool

ROOT = Path(__file__).resolve().parent.parent
KUBERNETES = ROOT / "deploy" / "kubernetes"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
# The oldest release the README promises, and the newest the installed schemas know.
RELEASES = ("1.30.0", kubernetes_validate.latest_version())
BASE_KINDS = {"ConfigMap", "Service", "Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget",
              "NetworkPolicy"}
VARIANTS = {  # folder under deploy/kubernetes -> the kinds it builds
    ".": BASE_KINDS,
    "monitoring": BASE_KINDS | {"ServiceMonitor", "PrometheusRule"},
    "autoscale-in-flight": BASE_KINDS,
    "grpc-probes": BASE_KINDS,
    "kserve": {"ServingRuntime", "InferenceService"},
}
CUSTOM_API_GROUPS = ("serving.kserve.io/", "monitoring.coreos.com/")
THREAD_SETTINGS = ("INTRA_OP_THREADS", "INFERENCE_WORKERS", "PREPROCESS_WORKERS")


def kustomize(variant: str) -> list[dict]:
    kubectl = required_tool("kubectl")
    built = subprocess.run([kubectl, "kustomize", str(KUBERNETES / variant)], capture_output=True,
                           text=True, timeout=60)
    if built.returncode != 0:  # Debian's kubectl 1.20 cannot build folders of folders
        version = subprocess.run([kubectl, "version", "--client"], capture_output=True, text=True)
        pytest.fail(f"{version.stdout.strip()}: {built.stderr}")
    return [doc for doc in yaml.safe_load_all(built.stdout) if doc]


@pytest.fixture(scope="module")
def builds() -> dict[str, list[dict]]:
    return {variant: kustomize(variant) for variant in VARIANTS}


def one(objects: list[dict], kind: str) -> dict:
    [found] = [o for o in objects if o["kind"] == kind]
    return found


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def service_paths() -> set[str]:
    """The paths the service answers, from its OpenAPI schema."""
    return set(create_app(Settings()).openapi()["paths"])


def dockerfile_user() -> str:
    users = re.findall(r"^USER\s+(\S+)", (ROOT / "Dockerfile").read_text(), re.MULTILINE)
    return users[-1]


# Building and validating ------------------------------------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_builds_with_kubectl_kustomize(builds, variant):
    assert {o["kind"] for o in builds[variant]} == VARIANTS[variant]
    assert all(o["metadata"]["name"].startswith("cnn-serve") for o in builds[variant])


@pytest.mark.parametrize("release", RELEASES)
def test_every_kubernetes_object_validates_against_the_api_schema(builds, release):
    validated = 0
    for variant, objects in builds.items():
        for obj in objects:
            if obj["apiVersion"].startswith(CUSTOM_API_GROUPS):
                continue  # no schema ships for custom resources: checked structurally below
            try:  # strict: a misspelt or misplaced field is an error, not ignored
                kubernetes_validate.validate(obj, release, strict=True)
            except kubernetes_validate.ValidationError as error:
                path = ".".join(map(str, error.path))
                pytest.fail(f"{variant}: {obj['kind']}/{obj['metadata']['name']}: {path}: {error.message}")
            validated += 1
    assert validated == 4 * len(BASE_KINDS)  # the base, monitoring, autoscale-in-flight and grpc-probes


# The structure of the custom resources: the fields their controllers read, and no others.
# Transcribed from KServe's Go types (serving.kserve.io) and the operator's ServiceMonitor.
LABELS = {"type": "object", "additionalProperties": {"type": "string"}}
SERVING_RUNTIME_SPEC = {
    "type": "object", "additionalProperties": False, "required": ["containers", "supportedModelFormats"],
    "properties": {
        "supportedModelFormats": {"type": "array", "minItems": 1, "items": {
            "type": "object", "additionalProperties": False, "required": ["name"],
            "properties": {"name": {"type": "string"}, "version": {"type": "string"},
                           "autoSelect": {"type": "boolean"}, "priority": {"type": "integer", "minimum": 1}}}},
        "protocolVersions": {"type": "array", "items": {"enum": ["v1", "v2", "grpc-v1", "grpc-v2"]}},
        "multiModel": {"type": "boolean"}, "disabled": {"type": "boolean"},
        "annotations": LABELS, "labels": LABELS, "nodeSelector": LABELS,
        "containers": {"type": "array", "minItems": 1}, "volumes": {"type": "array"},
        "affinity": {"type": "object"}, "tolerations": {"type": "array"},
        "imagePullSecrets": {"type": "array"}}}
INFERENCE_SERVICE_SPEC = {
    "type": "object", "additionalProperties": False, "required": ["predictor"],
    "properties": {"predictor": {
        "type": "object", "additionalProperties": False, "required": ["model"],
        "properties": {
            "minReplicas": {"type": "integer", "minimum": 0}, "maxReplicas": {"type": "integer", "minimum": 0},
            "model": {"type": "object", "additionalProperties": False, "required": ["modelFormat"],
                      "properties": {
                          "modelFormat": {"type": "object", "additionalProperties": False,
                                          "required": ["name"],
                                          "properties": {"name": {"type": "string"},
                                                         "version": {"type": "string"}}},
                          "runtime": {"type": "string"}, "storageUri": {"type": "string"},
                          "protocolVersion": {"enum": ["v1", "v2", "grpc-v1", "grpc-v2"]}}}}}}}
SERVICE_MONITOR_SPEC = {
    "type": "object", "additionalProperties": False, "required": ["selector", "endpoints"],
    "properties": {
        "selector": {"type": "object", "properties": {"matchLabels": LABELS}},
        "namespaceSelector": {"type": "object"}, "jobLabel": {"type": "string"},
        "endpoints": {"type": "array", "minItems": 1, "items": {
            "type": "object", "additionalProperties": False,
            "properties": {"port": {"type": "string"}, "path": {"type": "string", "pattern": "^/"},
                           "scheme": {"enum": ["http", "https"]},
                           "interval": {"type": "string", "pattern": r"^(\d+(ms|s|m|h))+$"},
                           "scrapeTimeout": {"type": "string", "pattern": r"^(\d+(ms|s|m|h))+$"}}}}}}
CUSTOM_RESOURCES = {  # kind -> (apiVersion, schema of spec)
    "ServingRuntime": ("serving.kserve.io/v1alpha1", SERVING_RUNTIME_SPEC),
    "InferenceService": ("serving.kserve.io/v1beta1", INFERENCE_SERVICE_SPEC),
    "ServiceMonitor": ("monitoring.coreos.com/v1", SERVICE_MONITOR_SPEC),
    "PrometheusRule": ("monitoring.coreos.com/v1", {"type": "object", "required": ["groups"]}),
}


def test_every_custom_resource_has_the_structure_its_controller_reads(builds):
    seen = set()
    for objects in builds.values():
        for obj in objects:
            if not obj["apiVersion"].startswith(CUSTOM_API_GROUPS):
                continue
            api_version, spec_schema = CUSTOM_RESOURCES[obj["kind"]]
            assert obj["apiVersion"] == api_version, obj["kind"]
            assert set(obj) == {"apiVersion", "kind", "metadata", "spec"}, obj["kind"]
            jsonschema.validate(obj["spec"], spec_schema)
            seen.add(obj["kind"])
    assert seen == set(CUSTOM_RESOURCES)


@pytest.mark.parametrize("release", RELEASES)
def test_the_kserve_runtimes_containers_and_volumes_validate_as_a_pod(builds, release):
    runtime = one(builds["kserve"], "ServingRuntime")["spec"]
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "cnn-serve"},
           "spec": {"containers": runtime["containers"], "volumes": runtime["volumes"]}}
    kubernetes_validate.validate(pod, release, strict=True)


def test_the_inference_service_runs_on_the_runtime_with_the_open_inference_protocol(builds):
    runtime = one(builds["kserve"], "ServingRuntime")
    model = one(builds["kserve"], "InferenceService")["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["modelFormat"]["name"] in {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
    assert model["protocolVersion"] == "v2" and "v2" in runtime["spec"]["protocolVersions"]
    assert "storageUri" not in model  # the image carries its model repository
    [container] = runtime["spec"]["containers"]
    port = int(env_of(container)["PORT"]["value"])
    assert container["name"] == "kserve-container" and container["ports"][0]["containerPort"] == port
    # Probes and scrapes on the admin listener, which busy clients cannot starve.
    admin = Settings.model_fields["admin_port"].default
    assert container["ports"][1]["containerPort"] == admin
    assert runtime["spec"]["annotations"]["prometheus.kserve.io/port"] == str(admin)
    routes = service_paths()
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] in routes and container[probe]["httpGet"]["port"] == admin


# What the base pins ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def base(builds) -> list[dict]:
    return builds["."]


@pytest.fixture(scope="module")
def pod(base) -> dict:
    return one(base, "Deployment")["spec"]["template"]["spec"]


@pytest.fixture(scope="module")
def container(pod) -> dict:
    [container] = pod["containers"]
    return container


def hardened(context: dict) -> None:
    assert context["allowPrivilegeEscalation"] is False
    assert context["readOnlyRootFilesystem"] is True
    assert context.get("privileged", False) is False
    assert context["capabilities"] == {"drop": ["ALL"]}


def test_the_pod_runs_as_the_images_numeric_user_with_nothing_to_escalate(pod, container, builds):
    user, _, group = dockerfile_user().partition(":")
    assert user.isdigit() and int(user) != 0, "runAsNonRoot needs the image's USER as a number"
    security = pod["securityContext"]
    assert security["runAsNonRoot"] is True
    assert (security["runAsUser"], security["runAsGroup"]) == (int(user), int(group or user))
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    hardened(container["securityContext"])
    assert pod["automountServiceAccountToken"] is False

    # KServe's runtime has no pod-level securityContext: the container carries all of it.
    [runtime] = one(builds["kserve"], "ServingRuntime")["spec"]["containers"]
    hardened(runtime["securityContext"])
    assert runtime["securityContext"]["runAsNonRoot"] is True
    assert runtime["securityContext"]["runAsUser"] == int(user)
    assert runtime["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}


def test_the_read_only_pod_writes_uploads_to_a_tmp_volume(pod, builds):
    runtime = one(builds["kserve"], "ServingRuntime")["spec"]
    for spec in (pod, runtime):
        [container] = spec["containers"]
        mounts = [m for m in container.get("volumeMounts", []) if m["mountPath"] == "/tmp"]
        assert len(mounts) == 1, "nothing writable at /tmp: uploads over 1 MB are spooled there"
        [volume] = [v for v in spec["volumes"] if v["name"] == mounts[0]["name"]]
        assert "emptyDir" in volume and volume["emptyDir"]["sizeLimit"]
        assert not mounts[0].get("readOnly", False)


def test_probes_ask_the_services_health_endpoints(container):
    routes = service_paths()
    port = next(p for p in container["ports"] if p["name"] == "admin")
    assert port["containerPort"] == Settings.model_fields["admin_port"].default
    expected = {"startupProbe": "/health/live", "readinessProbe": "/health/ready",
                "livenessProbe": "/health/live"}
    for probe, path in expected.items():
        assert container[probe]["httpGet"] == {"path": path, "port": port["name"]}, probe
        assert path in routes
    # Liveness never fails while the models load: the startup probe covers only the listener.
    assert "/health/ready" not in (container["startupProbe"]["httpGet"]["path"],
                                   container["livenessProbe"]["httpGet"]["path"])


def test_the_grpc_variant_asks_readiness_over_grpc_health_on_the_grpc_port(builds):
    [deployment] = [o for o in builds["grpc-probes"] if o["kind"] == "Deployment"]
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    grpc_port = next(p for p in container["ports"] if p["name"] == "grpc")
    assert grpc_port["containerPort"] == Settings.model_fields["grpc_port"].default
    assert container["readinessProbe"]["grpc"] == {"port": grpc_port["containerPort"]}
    assert "httpGet" not in container["readinessProbe"]
    [service] = [o for o in builds["grpc-probes"] if o["kind"] == "Service"]
    assert {"name": "grpc", "port": 8001, "targetPort": "grpc", "protocol": "TCP",
            "appProtocol": "kubernetes.io/h2c"} in service["spec"]["ports"]


def test_a_terminating_pod_drains_then_finishes_its_requests_before_sigkill(pod, container, base):
    env = env_of(container)
    settings = one(base, "ConfigMap")["data"]
    drain = float(env["DRAIN_SECONDS"]["value"])
    graceful = float(env["GRACEFUL_SHUTDOWN_SECONDS"]["value"])
    readiness = container["readinessProbe"]
    assert drain >= readiness["periodSeconds"] * readiness["failureThreshold"], \
        "endpoints that follow readiness must see the 503 before the listener closes"
    assert pod["terminationGracePeriodSeconds"] > drain + graceful
    assert float(settings["REQUEST_TIMEOUT_SECONDS"]) <= graceful, \
        "a request admitted just before the listener closes must finish within the grace"


def test_threads_follow_the_cpu_limit_and_resources_are_bounded(container):
    resources = container["resources"]
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(resources[kind]), kind
    env = env_of(container)
    for name in THREAD_SETTINGS:
        assert env[name]["valueFrom"] == {"resourceFieldRef": {"resource": "limits.cpu", "divisor": "1"}}


def test_every_variable_the_pod_sets_is_a_service_setting(container, base):
    known = {name.upper() for name in Settings.model_fields}
    configured = set(env_of(container)) | set(one(base, "ConfigMap")["data"])
    assert configured <= known, configured - known
    [source] = container["envFrom"]
    assert source["configMapRef"]["name"] == one(base, "ConfigMap")["metadata"]["name"]


def test_the_api_key_comes_from_an_optional_secret(container):
    assert env_of(container)["API_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": "cnn-serve-api-key", "key": "API_KEY", "optional": True}


def test_service_autoscaler_budget_and_policy_all_select_the_pods(base, pod, container):
    deployment = one(base, "Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert "replicas" not in deployment["spec"], "the autoscaler owns the replica count"

    service = one(base, "Service")
    assert service["spec"]["selector"].items() <= labels.items()
    assert [p["targetPort"] for p in service["spec"]["ports"]] == [p["name"] for p in container["ports"]]

    autoscaler = one(base, "HorizontalPodAutoscaler")["spec"]
    assert autoscaler["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                            "name": deployment["metadata"]["name"]}
    assert autoscaler["minReplicas"] >= 2
    assert [m["resource"]["name"] for m in autoscaler["metrics"]] == ["cpu"]

    budget = one(base, "PodDisruptionBudget")["spec"]
    assert budget["selector"]["matchLabels"].items() <= labels.items()
    assert budget["maxUnavailable"] == 1

    policy = one(base, "NetworkPolicy")["spec"]
    assert policy["podSelector"]["matchLabels"].items() <= labels.items()
    assert policy["policyTypes"] == ["Ingress", "Egress"] and policy["egress"] == []
    [rule] = policy["ingress"]
    assert rule["ports"] == [{"port": p["containerPort"], "protocol": "TCP"} for p in container["ports"]]


def test_the_in_flight_autoscaler_asks_for_the_metric_the_adapter_serves(builds):
    [pods_metric] = [m for m in one(builds["autoscale-in-flight"], "HorizontalPodAutoscaler")["spec"]["metrics"]
                     if m["type"] == "Pods"]
    adapter = yaml.safe_load((KUBERNETES / "autoscale-in-flight" / "prometheus-adapter-values.yaml").read_text())
    [rule] = adapter["rules"]["custom"]
    assert pods_metric["pods"]["metric"]["name"] == rule["name"]["as"]
    series = re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", rule["seriesQuery"].strip("'\"")).group()
    assert re.search(rf"^{series} ", Metrics().prometheus_text().decode(), re.MULTILINE), \
        f"the service exports no {series}"


def test_the_service_monitor_scrapes_the_services_port_and_the_alerts_match_compose(builds):
    monitoring = builds["monitoring"]
    service = one(monitoring, "Service")
    endpoint = one(monitoring, "ServiceMonitor")["spec"]["endpoints"][0]
    selector = one(monitoring, "ServiceMonitor")["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    assert endpoint["port"] == "admin" and endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"
    # The job label is the Service's name, which CnnServeDown selects.
    assert f'job="{service["metadata"]["name"]}"' in ALERTS.read_text()
    assert one(monitoring, "PrometheusRule")["spec"]["groups"] == yaml.safe_load(ALERTS.read_text())["groups"]
