"""infra/: every manifest parses and validates against its schema, and the deployment's deliberate choices hold.

Kubernetes-native objects are validated offline against Kubernetes' OpenAPI schema (kubernetes-validate, strict:
unknown fields are errors, as `kubectl apply` does), KubeRay objects against the ray.io/v1 CRD schema (pruned copy
in infra/kuberay/schema/) with their pod templates against Kubernetes' PodTemplate, and the cluster launcher config
against the installed Ray's own ray-schema.json.
"""

import copy
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
import yaml

INFRA = Path(__file__).resolve().parents[1] / "infra"
K8S_VERSION = "1.33.0"  # a version kubernetes-validate ships; the manifests use only long-stable fields
PROJECT_IMAGE = "registry.example.com/vgg:v1"
TRACKING_URI = "http://mlflow.vgg.svc:5000"
# Backing services that are not the project: pinned upstream images
THIRD_PARTY_IMAGES = {"postgres:17.6", "quay.io/minio/minio:RELEASE.2025-04-22T22-12-26Z"}
ARCHIVES = ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar", "ILSVRC2012_devkit_t12.tar.gz")
LAUNCHER = INFRA / "ray" / "cluster.yaml"


def _documents() -> list[tuple[Path, dict]]:
    return [
        (path, doc)
        for path in sorted(INFRA.rglob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
        if doc is not None
    ]


DOCS = _documents()
K8S_DOCS = [(p, d) for p, d in DOCS if p != LAUNCHER and not d["apiVersion"].startswith("ray.io/")]
RAY_DOCS = [(p, d) for p, d in DOCS if d.get("apiVersion", "").startswith("ray.io/")]


def _doc_id(item: tuple[Path, dict]) -> str:
    path, doc = item
    name = doc.get("metadata", {}).get("name", doc.get("cluster_name"))
    return f"{path.relative_to(INFRA)}:{doc.get('kind', 'launcher')}/{name}"


def _one(kind: str, name: str) -> dict:
    (doc,) = [d for _, d in DOCS if d.get("kind") == kind and d["metadata"]["name"] == name]
    return doc


def _ray_cluster_specs() -> list[dict]:
    return [d["spec"] if d["kind"] == "RayCluster" else d["spec"]["rayClusterSpec"] for _, d in RAY_DOCS]


def _pod_templates() -> list[tuple[str, dict]]:
    """Every pod template in infra/, named for messages: Deployments, StatefulSets, Jobs and KubeRay groups."""
    templates = [(_doc_id((p, d)), d["spec"]["template"]) for p, d in K8S_DOCS if "template" in d.get("spec", {})]
    for path, doc in RAY_DOCS:
        spec = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
        templates.append((f"{_doc_id((path, doc))}:head", spec["headGroupSpec"]["template"]))
        templates += [(f"{_doc_id((path, doc))}:{g['groupName']}", g["template"]) for g in spec["workerGroupSpecs"]]
    return templates


def _containers(template: dict) -> list[dict]:
    return template["spec"]["containers"] + template["spec"].get("initContainers", [])


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def _strict(schema: dict) -> dict:
    """Reject fields the CRD does not declare, as the API server's strict field validation does (a CRD schema
    without additionalProperties would otherwise let a misspelt field through, and KubeRay would drop it)."""
    out = copy.deepcopy(schema)
    stack = [out]
    while stack:
        node = stack.pop()
        if "properties" in node and "additionalProperties" not in node:
            node["additionalProperties"] = False
        stack += list(node.get("properties", {}).values())
        if isinstance(node.get("items"), dict):
            stack.append(node["items"])
    return out


def _crd_validator(kind: str) -> jsonschema.Draft7Validator:
    schema = json.loads((INFRA / "kuberay" / "schema" / f"{kind.lower()}.v1.json").read_text())
    return jsonschema.Draft7Validator(_strict(schema))


def _validate_pod_template(template: dict) -> None:
    pod_template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template}
    kubernetes_validate.validate(pod_template, K8S_VERSION, strict=True)


def _launcher_schema() -> dict:
    # Located without importing ray (seconds): the schema the installed Ray's `ray up` validates with
    (ray_dir,) = importlib.util.find_spec("ray").submodule_search_locations
    return json.loads((Path(ray_dir) / "autoscaler" / "ray-schema.json").read_text())


# --- every file parses -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(INFRA.rglob("*.yaml")), ids=lambda p: str(p.relative_to(INFRA)))
def test_every_yaml_parses_into_mappings(path: Path) -> None:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs, f"{path} holds no document"
    assert all(isinstance(d, dict) for d in docs), f"{path} holds a document that is not a mapping"


# --- Kubernetes schemas ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("item", K8S_DOCS, ids=_doc_id)
def test_kubernetes_object_validates(item: tuple[Path, dict]) -> None:
    kubernetes_validate.validate(item[1], K8S_VERSION, strict=True)


def test_kubernetes_validation_rejects_a_misspelt_field() -> None:
    deployment = copy.deepcopy(_one("Deployment", "mlflow"))
    deployment["spec"]["template"]["spec"]["containers"][0]["enviroment"] = []
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


def test_all_kinds_expected_are_present() -> None:
    kinds = {d["kind"] for _, d in K8S_DOCS}
    assert {"Namespace", "PersistentVolumeClaim", "Secret", "Service", "StatefulSet", "Deployment", "Job"} <= kinds
    assert sorted(d["kind"] for _, d in RAY_DOCS) == ["RayCluster", "RayJob"]


@pytest.mark.parametrize("item", DOCS, ids=_doc_id)
def test_namespaced_objects_live_in_the_vgg_namespace(item: tuple[Path, dict]) -> None:
    doc = item[1]
    if item[0] == LAUNCHER or doc["kind"] == "Namespace":
        return
    assert doc["metadata"].get("namespace") == "vgg"


# --- KubeRay ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("item", RAY_DOCS, ids=_doc_id)
def test_kuberay_object_validates_against_its_crd(item: tuple[Path, dict]) -> None:
    doc = item[1]
    assert doc["apiVersion"] == "ray.io/v1"
    errors = [f"{list(e.path)}: {e.message}" for e in _crd_validator(doc["kind"]).iter_errors(doc)]
    assert not errors, errors


def test_crd_validation_rejects_a_misspelt_field() -> None:
    cluster = copy.deepcopy(_one("RayCluster", "vgg"))
    cluster["spec"]["workerGroupSpec"] = cluster["spec"].pop("workerGroupSpecs")
    assert list(_crd_validator("RayCluster").iter_errors(cluster))


@pytest.mark.parametrize("name, template", _pod_templates(), ids=[n for n, _ in _pod_templates()])
def test_pod_template_validates_against_kubernetes(name: str, template: dict) -> None:
    _validate_pod_template(template)


def test_ray_cluster_has_a_cpu_head_and_8_gpu_workers() -> None:
    spec = _one("RayCluster", "vgg")["spec"]
    head = spec["headGroupSpec"]
    assert head["serviceType"] == "ClusterIP"
    assert head["rayStartParams"]["num-cpus"] == "0"
    (head_container,) = head["template"]["spec"]["containers"]
    for section in ("requests", "limits"):
        assert "nvidia.com/gpu" not in head_container["resources"].get(section, {})
    assert spec["workerGroupSpecs"], "no worker group"
    for group in spec["workerGroupSpecs"]:
        (worker,) = group["template"]["spec"]["containers"]
        assert worker["resources"]["limits"]["nvidia.com/gpu"] == 8
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        assert group["template"]["spec"]["tolerations"] and group["template"]["spec"]["nodeSelector"]


@pytest.mark.parametrize("spec", _ray_cluster_specs(), ids=["raycluster", "rayjob"])
def test_ray_pods_share_data_tracking_and_token_auth(spec: dict) -> None:
    assert spec["authOptions"]["mode"] == "token"
    assert spec["rayVersion"] == "2.60.0"
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    for group in groups:
        assert all(isinstance(v, str) for v in group["rayStartParams"].values()), "rayStartParams must be strings"
        pod = group["template"]["spec"]
        volumes = [v for v in pod["volumes"] if "persistentVolumeClaim" in v]
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in volumes}
        (container,) = pod["containers"]
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert claims[mounts["/data"]] == "vgg-data"
        env = _env(container)
        assert env["MLFLOW_TRACKING_URI"]["value"] == TRACKING_URI
        assert env["RAY_USAGE_STATS_ENABLED"]["value"] == "0"


def test_data_volume_is_read_write_many() -> None:
    pvc = _one("PersistentVolumeClaim", "vgg-data")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]


def test_rayjob_runs_the_protocol_on_the_same_cluster_spec() -> None:
    job = _one("RayJob", "vgg-paper")["spec"]
    assert job["rayClusterSpec"] == _one("RayCluster", "vgg")["spec"], "rayjob.yaml drifted from raycluster.yaml"
    assert job["entrypoint"] == "bash /app/infra/protocol.sh"  # the image's copy of infra/ (Dockerfile: /app)
    assert job["shutdownAfterJobFinishes"] is True
    assert "entrypointNumCpus" not in job  # the head advertises num-cpus 0: a CPU request would never schedule


# --- images ----------------------------------------------------------------------------------------------------


def test_project_containers_all_run_the_one_project_image() -> None:
    images = {name: {c["image"] for c in _containers(t)} for name, t in _pod_templates()}
    backing = {"mlflow/postgres.yaml:StatefulSet/mlflow-postgres", "mlflow/minio.yaml:Deployment/mlflow-minio"}
    project = [n for n in images if n not in backing]
    assert len(project) == 6  # head + GPU group in RayCluster and in RayJob, MLflow server, bucket Job
    assert all(images[n] == {PROJECT_IMAGE} for n in project), images
    assert set().union(*images.values()) == {PROJECT_IMAGE} | THIRD_PARTY_IMAGES


def test_dockerfile_builds_the_project_with_the_lock() -> None:
    dockerfile = (INFRA / "docker" / "Dockerfile").read_text()
    assert "FROM python:3.11-" in dockerfile
    assert "--requirement /tmp/requirements.lock" in dockerfile
    assert "pip install --no-deps /app" in dockerfile
    assert f"-t {PROJECT_IMAGE} ." in dockerfile
    lock = (INFRA.parent / "requirements.lock").read_text().split()
    for pin in ("torch==2.14.1", "ray==2.60.0", "mlflow==3.17.2", "dvc==3.67.1"):
        assert pin in lock, f"requirements.lock lacks {pin}"
    # The Dockerfile's build context must keep what the image needs and drop the local venv
    lines = (INFRA / "docker" / "Dockerfile.dockerignore").read_text().splitlines()
    ignored = {line.strip() for line in lines if line.strip() and not line.startswith("#")}
    assert ".venv/" in ignored and not {".git", ".git/", "infra/", "vgg/", "requirements.lock"} & ignored


# --- MLflow ----------------------------------------------------------------------------------------------------


def _mlflow_args() -> dict[str, str]:
    (container,) = _one("Deployment", "mlflow")["spec"]["template"]["spec"]["containers"]
    assert container["command"][:2] == ["mlflow", "server"]
    return dict(arg.removeprefix("--").split("=", 1) for arg in container["command"][2:])


def test_mlflow_server_binds_deliberately() -> None:
    args = _mlflow_args()
    assert args["host"] == "0.0.0.0" and int(args["workers"]) >= 1
    assert args["artifacts-destination"].startswith("s3://")
    backend = urlsplit(args["backend-store-uri"])
    assert backend.scheme == "postgresql" and backend.password is None, "password in the backend URI"
    assert _one("Service", "mlflow")["spec"]["type"] == "ClusterIP"
    assert all(d["spec"].get("type", "ClusterIP") == "ClusterIP" for _, d in K8S_DOCS if d["kind"] == "Service")
    assert not [d for _, d in K8S_DOCS if d["kind"] == "Ingress"]


def test_mlflow_allowed_hosts_admit_the_ray_pods_and_nothing_else() -> None:
    # MLflow 3.17 compares the whole Host header, port included, with each entry (fnmatch where it has a "*",
    # mlflow.server.security_utils.is_allowed_host_header); passing the flag replaces its default list, which would
    # admit every private IP. Importing mlflow to call it costs seconds, so the rule is applied here.
    allowed = _mlflow_args()["allowed-hosts"].split(",")
    service_names = {"mlflow", "mlflow.vgg", "mlflow.vgg.svc", "mlflow.vgg.svc.cluster.local"}
    assert set(allowed) == {f"{name}:5000" for name in service_names} | {"localhost:*", "127.0.0.1:*"}
    assert urlsplit(TRACKING_URI).netloc in allowed  # the Host header the Ray pods send


def test_credentials_come_only_from_secrets_with_placeholder_values() -> None:
    for name, template in _pod_templates():
        for container in _containers(template):
            for var in container.get("env", []):
                if any(word in var["name"] for word in ("PASSWORD", "SECRET", "TOKEN", "ACCESS_KEY")):
                    assert "secretKeyRef" in var.get("valueFrom", {}), f"{name}: {var['name']} is not from a Secret"
            for arg in container.get("command", []) + container.get("args", []):
                assert urlsplit(arg.split("=", 1)[-1]).password is None, f"{name}: password in {arg}"
    secrets = [d for _, d in K8S_DOCS if d["kind"] == "Secret"]
    assert secrets
    for secret in secrets:
        assert "data" not in secret
        assert all(v.startswith("REPLACE_ME") for v in secret["stringData"].values()), secret["metadata"]["name"]


def test_every_secret_reference_resolves() -> None:
    keys = {(d["metadata"]["name"], k) for _, d in K8S_DOCS if d["kind"] == "Secret" for k in d["stringData"]}
    refs = {
        (ref["name"], ref["key"])
        for _, template in _pod_templates()
        for container in _containers(template)
        for var in container.get("env", [])
        if (ref := var.get("valueFrom", {}).get("secretKeyRef"))
    }
    assert refs and refs <= keys, refs - keys


# --- Ray cluster launcher --------------------------------------------------------------------------------------


def test_launcher_config_validates_against_rays_schema() -> None:
    config = yaml.safe_load(LAUNCHER.read_text())
    jsonschema.validate(config, _launcher_schema())
    assert config["head_node_type"] in config["available_node_types"]
    bad = {**config, "head_node": config["head_node_type"]}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, _launcher_schema())


def test_launcher_installs_the_project_and_shares_the_token() -> None:
    config = yaml.safe_load(LAUNCHER.read_text())
    assert config["file_mounts"]["/home/ubuntu/vgg"] == "."
    assert "~/.ray/auth_token" in config["file_mounts"].values()
    setup = "\n".join(config["setup_commands"])
    assert "--requirement ~/vgg/requirements.lock" in setup and "--no-deps" in setup and "~/vgg\n" in setup + "\n"
    assert "--python 3.11" in setup
    assert any("RAY_AUTH_MODE=token" in c for c in config["initialization_commands"])
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}
    workers = [t for n, t in config["available_node_types"].items() if n != config["head_node_type"]]
    assert workers and all(t["node_config"]["InstanceType"] == "p5.48xlarge" for t in workers)
    assert any("MLFLOW_TRACKING_URI" in c for c in config["worker_start_ray_commands"])


def test_launcher_commands_are_valid_shell() -> None:
    config = yaml.safe_load(LAUNCHER.read_text())
    sections = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
                "head_start_ray_commands", "worker_start_ray_commands")
    for command in [c for section in sections for c in config[section]]:
        result = subprocess.run(["bash", "-n", "-c", command], capture_output=True, text=True)
        assert result.returncode == 0, f"{command}: {result.stderr}"


# --- the protocol entrypoint -----------------------------------------------------------------------------------


def _path() -> str:
    return f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"  # dvc from this environment


def _run_protocol(tmp_path: Path, *, raw: Path, source: Path) -> subprocess.CompletedProcess:
    env = {
        "PATH": _path(),
        "HOME": str(tmp_path),
        "VGG_SOURCE": str(source),
        "VGG_RAW": str(raw),
        "VGG_WORK_ROOT": str(tmp_path / "work"),
        "VGG_DVC_CACHE": str(tmp_path / "cache"),
    }
    return subprocess.run(["bash", str(INFRA / "protocol.sh")], env=env, capture_output=True, text=True, timeout=60)


def test_protocol_refuses_to_start_without_the_archives(tmp_path: Path) -> None:
    raw = tmp_path / "imagenet"
    raw.mkdir()
    (raw / ARCHIVES[0]).touch()
    result = _run_protocol(tmp_path, raw=raw, source=tmp_path / "absent")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"error: {raw}/{ARCHIVES[1]} is missing: copy the three ILSVRC-2012 archives to {raw} (infra/README.md)"
    )
    assert not (tmp_path / "work").exists()


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_protocol_runs_dvc_with_the_paper_profile_in_a_workspace_on_the_volume(tmp_path: Path) -> None:
    # A miniature project with the same params keys: one stage that writes the profile and raw path it was given
    source = tmp_path / "source"
    source.mkdir()
    (source / "params.yaml").write_text("profile: small\nprofiles:\n  paper:\n    data:\n      raw: ''\n")
    (source / "dvc.yaml").write_text(
        "stages:\n  probe:\n    cmd: echo ${profile} ${profiles.paper.data.raw} > probe.txt\n"
        "    params: [profile, profiles.paper.data.raw]\n    outs: [probe.txt]\n"
    )
    git = ["git", "-C", str(source), "-c", "user.name=t", "-c", "user.email=t@localhost"]
    subprocess.run(["git", "init", "--quiet", str(source)], check=True)
    subprocess.run(["dvc", "init", "--quiet"], cwd=source, check=True, env={**os.environ, "PATH": _path()})
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "--quiet", "-m", "miniature"], check=True)
    commit = subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()
    raw = tmp_path / "imagenet"
    raw.mkdir()
    for archive in ARCHIVES:
        (raw / archive).touch()

    result = _run_protocol(tmp_path, raw=raw, source=source)

    assert result.returncode == 0, result.stderr
    probe = tmp_path / "work" / commit[:12] / "probe.txt"
    assert probe.read_text().split() == ["paper", str(raw)]
    assert probe.stat().st_nlink > 1 or probe.is_symlink(), "output copied instead of linked from the DVC cache"
    assert any((tmp_path / "cache").rglob("*")), "the shared DVC cache was not used"
    assert not list((tmp_path / "work").glob(".clone-*")), "a staging clone was left behind"
