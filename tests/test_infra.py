"""infra/: every manifest parses and validates against its schema, and the deployment's deliberate choices hold.

Kubernetes-native objects are validated offline against Kubernetes' OpenAPI schema (kubernetes-validate, strict:
unknown fields are errors, as `kubectl apply` does), KubeRay objects against the ray.io/v1 CRD schema (pruned copy
in infra/kuberay/schema/) with their pod templates against Kubernetes' PodTemplate, and the cluster launcher config
against the installed Ray's own ray-schema.json. The security settings are checked on the files themselves: every
pod against the rules of Kubernetes' "restricted" Pod Security profile, every NetworkPolicy by which pod templates
of infra/ it admits, MLflow's auth configuration against the installed MLflow, every image reference for a digest,
every pin of the lock files for its hashes.
"""

import ast
import configparser
import copy
import importlib.util
import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import click
import jsonschema
import kubernetes_validate
import pytest
import yaml

from pipelines.cluster import STORAGE_ENV, STORAGE_SHARED_ENV

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
K8S_VERSION = "1.33.0"  # a version kubernetes-validate ships; the manifests use only long-stable fields
PROJECT_IMAGE = "registry.example.com/vgg:v1"
TRACKING_URI = "http://mlflow.vgg.svc:5000"
# Backing services that are not the project: upstream images
POSTGRES_IMAGE = "postgres:17.6"
MINIO_IMAGE = "quay.io/minio/minio:RELEASE.2025-04-22T22-12-26Z"
PYTHON_IMAGE = "python:3.11-slim-bookworm"  # the Dockerfile's base
# Image references pinned by tag only, each with the reason. Every other image reference in infra/ must be
# `name:tag@sha256:<digest>`. The digests of these are not in the files because they could not be looked up where
# the files were written (no registry access): infra/README.md, step 1, resolves each with `crane digest` at
# deploy time and builds and renders with `name:tag@sha256:<digest>`. Pinning one in a file means moving it out of
# this list (and out of README's render, which would otherwise add a second digest).
TAG_PINNED = {
    PROJECT_IMAGE: "placeholder for the image the user builds; render() replaces it by the pushed name:tag@sha256",
    POSTGRES_IMAGE: "digest to fill in at deploy: README step 1 renders it as postgres:17.6@sha256:<digest>",
    MINIO_IMAGE: "digest to fill in at deploy: README step 1 renders it with @sha256:<digest>",
    PYTHON_IMAGE: "the Dockerfile's default base; README step 1 builds with --build-arg PYTHON_IMAGE=...@sha256:...",
}
DIGEST_PINNED = re.compile(r"^[^@\s]+:[\w][\w.-]{0,127}@sha256:[0-9a-f]{64}$")  # name:tag@sha256:<digest>
# The user each image runs as (uid = gid): the project image's `ray`, Postgres' `postgres`, MinIO's none (any uid)
IMAGE_USER = {PROJECT_IMAGE: 1000, POSTGRES_IMAGE: 999, MINIO_IMAGE: 1000}
METADATA_V4 = ipaddress.ip_address("169.254.169.254")
METADATA_V6 = ipaddress.ip_address("fd00:ec2::254")
ARCHIVES = ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar", "ILSVRC2012_devkit_t12.tar.gz")
LAUNCHER = INFRA / "ray" / "cluster.yaml"
README = (INFRA / "README.md").read_text()


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
    """Every pod template in infra/, named for messages: Deployments, StatefulSets, Jobs, KubeRay groups and the
    RayJob's submitter."""
    templates = [(_doc_id((p, d)), d["spec"]["template"]) for p, d in K8S_DOCS if "template" in d.get("spec", {})]
    for path, doc in RAY_DOCS:
        spec = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
        templates.append((f"{_doc_id((path, doc))}:head", spec["headGroupSpec"]["template"]))
        templates += [(f"{_doc_id((path, doc))}:{g['groupName']}", g["template"]) for g in spec["workerGroupSpecs"]]
        if "submitterPodTemplate" in doc["spec"]:
            templates.append((f"{_doc_id((path, doc))}:submitter", doc["spec"]["submitterPodTemplate"]))
    return templates


def _template(name: str) -> dict:
    (template,) = [t for n, t in _pod_templates() if n == name]
    return template


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


def _mlflow_path() -> Path:
    # The installed MLflow's files, located without importing it (seconds)
    (mlflow_dir,) = importlib.util.find_spec("mlflow").submodule_search_locations
    return Path(mlflow_dir)


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
    assert {"Namespace", "PersistentVolumeClaim", "Secret", "Service", "StatefulSet", "Deployment", "Job",
            "NetworkPolicy", "ConfigMap"} <= kinds
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
        assert {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"} <= set(env)  # the server wants a login
        assert env["RAY_USAGE_STATS_ENABLED"]["value"] == "0"


@pytest.mark.parametrize("spec", _ray_cluster_specs(), ids=["raycluster", "rayjob"])
def test_the_head_puts_rays_storage_on_the_shared_volume_and_says_so(spec: dict) -> None:
    """Job drivers (infra/protocol.sh, `vgg train`) run on the head and inherit its environment: Ray's storage on the
    ReadWriteMany volume every Ray pod mounts at /data, declared shared, or `vgg train` stops on a cluster of
    several nodes."""
    (head,) = spec["headGroupSpec"]["template"]["spec"]["containers"]
    env = _env(head)
    storage = Path(env[STORAGE_ENV]["value"])
    assert storage.is_absolute() and storage.is_relative_to("/data") and storage != Path("/data")
    assert click.BOOL.convert(env[STORAGE_SHARED_ENV]["value"], None, None) is True
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:  # /data: the vgg-data claim on every pod
        (container,) = group["template"]["spec"]["containers"]
        assert "/data" in {m["mountPath"] for m in container["volumeMounts"]}


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


def _image_references() -> list[tuple[str, str]]:
    """(where, reference) for every image infra/ names: any `image` field of any YAML document (containers, init
    containers, whatever a CRD adds) and the Dockerfile's FROM lines, with ARG defaults substituted."""
    found: list[tuple[str, str]] = []

    def walk(node, where: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "image" and isinstance(value, str):
                    found.append((where, value))
                else:
                    walk(value, where)
        elif isinstance(node, list):
            for item in node:
                walk(item, where)

    for item in DOCS:
        walk(item[1], _doc_id(item))
    for dockerfile in sorted(INFRA.rglob("Dockerfile*")):
        if dockerfile.suffix == ".dockerignore":
            continue
        args: dict[str, str] = {}
        for line in dockerfile.read_text().splitlines():
            if match := re.match(r"ARG\s+(\w+)=(\S+)", line):
                args[match[1]] = match[2]
            elif match := re.match(r"FROM\s+(\S+)", line):
                ref = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args[m[1] or m[2]], match[1])
                found.append((str(dockerfile.relative_to(INFRA)), ref))
    return found


def test_every_image_is_pinned_by_digest_or_listed_as_tag_pinned() -> None:
    refs = _image_references()
    assert len(refs) >= 10, refs
    unpinned = {(where, ref) for where, ref in refs if not DIGEST_PINNED.match(ref) and ref not in TAG_PINNED}
    assert not unpinned, f"pin these by digest (name:tag@sha256:...) or list them in TAG_PINNED: {unpinned}"
    stale = set(TAG_PINNED) - {ref for _, ref in refs}
    assert not stale, f"TAG_PINNED lists images infra/ no longer names: {stale}"


def test_the_digest_rule_tells_a_digest_from_a_tag() -> None:
    digest = "sha256:" + "0123456789abcdef" * 4
    assert DIGEST_PINNED.match(f"{POSTGRES_IMAGE}@{digest}")
    assert DIGEST_PINNED.match(f"registry.example.com:5000/team/vgg:abc123@{digest}")
    for ref in (POSTGRES_IMAGE, "postgres@" + digest, f"{POSTGRES_IMAGE}@sha256:abc", "postgres:latest"):
        assert not DIGEST_PINNED.match(ref), ref


def test_readme_pins_every_tag_pinned_image_by_digest_at_deploy() -> None:
    # Each upstream image's digest is looked up once, and render() swaps every manifest's `image: <tag>` for it
    for ref in (POSTGRES_IMAGE, MINIO_IMAGE, PYTHON_IMAGE):
        assert f"crane digest {ref})" in README, ref
    for ref, variable in ((PROJECT_IMAGE, "IMAGE"), (POSTGRES_IMAGE, "POSTGRES_IMAGE"), (MINIO_IMAGE, "MINIO_IMAGE")):
        assert f'"s#image: {ref}#image: ${variable}#"' in README, ref
    assert 'export IMAGE="$IMAGE@$(crane digest "$IMAGE")"' in README
    assert '--build-arg PYTHON_IMAGE="$PYTHON_IMAGE"' in README
    # No file that names an image is applied without render
    with_images = {str(p.relative_to(INFRA.parent)) for p in INFRA.rglob("*.yaml") if "image:" in p.read_text()}
    applied = re.findall(r"^.*kubectl apply.*$", README, flags=re.M)
    for line in applied:
        for path in with_images:
            if path in line:
                assert line.strip().startswith("render "), f"applied without render (tag, not digest): {line}"
    assert any("render infra/mlflow/postgres.yaml" in line for line in applied)


def test_project_containers_all_run_the_one_project_image() -> None:
    images = {name: {c["image"].split("@")[0] for c in _containers(t)} for name, t in _pod_templates()}
    backing = {"mlflow/postgres.yaml:StatefulSet/mlflow-postgres": {POSTGRES_IMAGE},
               "mlflow/minio.yaml:Deployment/mlflow-minio": {MINIO_IMAGE},
               "mlflow/minio.yaml:Job/mlflow-bucket": {MINIO_IMAGE}}  # MinIO's client `mc` is in its image
    project = [n for n in images if n not in backing]
    # head + GPU group in RayCluster and in RayJob, the RayJob's submitter, MLflow server, MLflow users Job
    assert len(project) == 7, project
    assert all(images[n] == {PROJECT_IMAGE} for n in project), images
    assert {n: images[n] for n in backing} == backing


def test_dockerfile_builds_the_project_with_the_hashed_locks() -> None:
    dockerfile = (INFRA / "docker" / "Dockerfile").read_text()
    assert f"ARG PYTHON_IMAGE={PYTHON_IMAGE}\nFROM ${{PYTHON_IMAGE}}\n" in dockerfile
    assert re.search(r"pip install --require-hashes --requirement /tmp/requirements.lock "
                     r"--requirement /tmp/requirements-server.txt\n", dockerfile)
    assert "COPY requirements.lock infra/docker/requirements-server.txt /tmp/" in dockerfile
    assert "pip install --no-deps --no-build-isolation /app" in dockerfile
    assert re.search(r"^USER 1000:1000$", dockerfile, flags=re.M)  # by number: runAsNonRoot can check it
    assert f"-t {PROJECT_IMAGE} ." in dockerfile
    lock = _pins(ROOT / "requirements.lock")
    for name, version in (("torch", "2.14.1"), ("ray", "2.60.0"), ("mlflow", "3.17.2"), ("dvc", "3.67.1")):
        assert lock[name][0] == version, f"requirements.lock lacks {name}=={version}"
    # The Dockerfile's build context must keep what the image needs and drop the local venv
    lines = (INFRA / "docker" / "Dockerfile.dockerignore").read_text().splitlines()
    ignored = {line.strip() for line in lines if line.strip() and not line.startswith("#")}
    assert ".venv/" in ignored and not {".git", ".git/", "infra/", "vgg/", "requirements.lock"} & ignored


# --- lock files: every pin with its hashes ---------------------------------------------------------------------


def _pins(path: Path) -> dict[str, tuple[str, list[str]]]:
    """{normalized name: (version, [sha256, ...])} of a requirements file, read as pip reads it (backslash
    continuations joined, comments dropped); an error on any line that is not `name==version [; marker] --hash...`."""
    pins: dict[str, tuple[str, list[str]]] = {}
    for line in re.sub(r"\\\n", " ", path.read_text()).splitlines():
        line = line.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+?)(?:\s*;[^-]*?)?((?:\s+--hash=sha256:\S+)*)", line)
        assert match, f"{path.name}: not a hashed pin: {line[:100]}"
        hashes = re.findall(r"--hash=sha256:(\S+)", match[3])
        name = re.sub(r"[-_.]+", "-", match[1]).lower()
        assert name not in pins, f"{path.name}: {name} pinned twice"
        pins[name] = (match[2], hashes)
    return pins


@pytest.mark.parametrize("path", [ROOT / "requirements.lock", INFRA / "docker" / "requirements-server.txt"],
                         ids=lambda p: p.name)
def test_every_pin_carries_sha256_hashes(path: Path) -> None:
    pins = _pins(path)
    assert pins
    for name, (version, hashes) in pins.items():
        assert hashes, f"{path.name}: {name}=={version} has no --hash (run infra/hash_requirements.py {path.name})"
        bad = [h for h in hashes if not re.fullmatch(r"[0-9a-f]{64}", h)]
        assert not bad, f"{path.name}: {name}: malformed sha256 {bad}"


def test_the_pin_reader_rejects_a_pin_without_hashes_and_a_loose_one(tmp_path: Path) -> None:
    unhashed = tmp_path / "unhashed.txt"
    unhashed.write_text("six==1.17.0\n")
    assert _pins(unhashed)["six"] == ("1.17.0", [])
    loose = tmp_path / "loose.txt"
    loose.write_text("six>=1.16 \\\n    --hash=sha256:" + "0" * 64 + "\n")
    with pytest.raises(AssertionError):
        _pins(loose)


def test_installs_require_the_hashes() -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"pip install [^\n]*--require-hashes -r requirements.lock", makefile)
    setup = "\n".join(yaml.safe_load(LAUNCHER.read_text())["setup_commands"])
    assert "uv pip install --python ~/venv/bin/python --require-hashes --requirement ~/vgg/requirements.lock" in setup
    # Both files go into one image: one version of each package, and the lock has setuptools, which torch needs
    # (pip freeze leaves it out; without it --require-hashes refuses the install)
    lock, server = _pins(ROOT / "requirements.lock"), _pins(INFRA / "docker" / "requirements-server.txt")
    assert not set(lock) & set(server), set(lock) & set(server)
    assert "setuptools" in lock


def test_the_server_requirements_give_mlflow_basic_auth_what_it_imports() -> None:
    # `mlflow server --app-name basic-auth` imports flask_wtf (MLflow's `auth` extra); the image must have it
    (dist,) = _mlflow_path().parent.glob("mlflow-*.dist-info")
    extra = re.findall(r"^Requires-Dist: ([\w.-]+)(.*?); extra == \"auth\"$", (dist / "METADATA").read_text(), re.M)
    server = _pins(INFRA / "docker" / "requirements-server.txt")
    assert extra
    for name, spec in extra:
        name = re.sub(r"[-_.]+", "-", name).lower()
        assert name in server, f"requirements-server.txt lacks {name} (mlflow[auth])"
        if spec.startswith("<"):
            assert int(server[name][0].split(".")[0]) < int(spec.lstrip("<").split(".")[0]), (name, spec)
    assert "wtforms" in server  # Flask-WTF's own dependency, not in the lock


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


def test_mlflow_requires_a_login() -> None:
    args = _mlflow_args()
    assert args["app-name"] == "basic-auth"
    (container,) = _template("mlflow/mlflow.yaml:Deployment/mlflow")["spec"]["containers"]
    env = _env(container)
    assert env["MLFLOW_AUTH_ADMIN_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "mlflow-auth",
                                                                             "key": "admin-password"}
    assert env["MLFLOW_FLASK_SERVER_SECRET_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "mlflow-auth"
    # Every variable the manifests set for MLflow is one the installed MLflow reads
    variables = (_mlflow_path() / "environment_variables.py").read_text()
    mlflow_vars = {v for _, t in _pod_templates() for c in _containers(t) for v in _env(c) if v.startswith("MLFLOW_")}
    assert {"MLFLOW_AUTH_CONFIG_PATH", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"} <= mlflow_vars
    for var in mlflow_vars:
        assert f'{var} = _EnvironmentVariable("{var}"' in variables, f"the installed MLflow has no {var}"


def _auth_config() -> configparser.ConfigParser:
    """The auth configuration the MLflow server reads: the ConfigMap key its MLFLOW_AUTH_CONFIG_PATH names."""
    template = _template("mlflow/mlflow.yaml:Deployment/mlflow")
    (container,) = template["spec"]["containers"]
    path = Path(_env(container)["MLFLOW_AUTH_CONFIG_PATH"]["value"])
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == str(path.parent)]
    (volume,) = [v for v in template["spec"]["volumes"] if v["name"] == mount["name"]]
    config_map = _one("ConfigMap", volume["configMap"]["name"])
    config = configparser.ConfigParser()
    config.read_string(config_map["data"][path.name])
    return config


def test_mlflow_auth_config_is_one_mlflow_reads_with_no_password_in_it() -> None:
    section = _auth_config()["mlflow"]
    shipped = configparser.ConfigParser()  # MLflow's own default file names every key (some commented out)
    shipped.read_string(re.sub(r"^# (\w+ =)", r"\1", (_mlflow_path() / "server/auth/basic_auth.ini").read_text(),
                               flags=re.M))
    assert set(section) <= set(shipped["mlflow"]), set(section) - set(shipped["mlflow"])
    assert "admin_password" not in section  # MLFLOW_AUTH_ADMIN_PASSWORD, from the Secret
    assert section["default_permission"] in {"READ", "NO_PERMISSIONS"}  # no user may change what it did not create
    assert section["admin_username"] == "admin"
    database = urlsplit(section["database_uri"])
    assert database.scheme == "postgresql" and database.password is None and database.path == "/mlflow_auth"
    backend = urlsplit(_mlflow_args()["backend-store-uri"])
    assert (database.hostname, database.username) == (backend.hostname, backend.username)  # PGPASSWORD serves both
    # The database exists before the server starts: its init container creates it, with the same password
    (init,) = _template("mlflow/mlflow.yaml:Deployment/mlflow")["spec"]["initContainers"]
    assert "CREATE DATABASE mlflow_auth" in init["command"][-1]
    assert "PGPASSWORD" in _env(init)


def test_the_ray_pods_log_as_the_user_the_users_job_creates() -> None:
    job = _template("mlflow/mlflow.yaml:Job/mlflow-users")
    (container,) = job["spec"]["containers"]
    env = _env(container)
    assert env["MLFLOW_TRACKING_USERNAME"]["value"] == _auth_config()["mlflow"]["admin_username"]
    assert env["MLFLOW_TRACKING_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "mlflow-auth",
                                                                           "key": "admin-password"}
    created = {env[v]["valueFrom"]["secretKeyRef"]["key"]: env[v]["valueFrom"]["secretKeyRef"]["name"]
               for v in ("RAY_MLFLOW_USERNAME", "RAY_MLFLOW_PASSWORD")}
    assert created == {"username": "mlflow-tracking", "password": "mlflow-tracking"}
    script = container["command"][-1]
    for var in ("RAY_MLFLOW_USERNAME", "RAY_MLFLOW_PASSWORD", "MLFLOW_TRACKING_URI"):
        assert f'os.environ["{var}"]' in script
    # The client methods it calls exist in the installed MLflow
    client = (_mlflow_path() / "server/auth/client.py").read_text()
    calls = {node.func.attr for node in ast.walk(ast.parse(script))
             if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
             and isinstance(node.func.value, ast.Name) and node.func.value.id == "client"}
    assert calls == {"get_user", "create_user", "update_user_password"}
    assert all(f"    def {call}(" in client for call in calls)
    for spec in _ray_cluster_specs():
        for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
            (ray,) = group["template"]["spec"]["containers"]
            assert _env(ray)["MLFLOW_TRACKING_USERNAME"]["valueFrom"]["secretKeyRef"] == {"name": "mlflow-tracking",
                                                                                         "key": "username"}
            assert _env(ray)["MLFLOW_TRACKING_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "mlflow-tracking",
                                                                                         "key": "password"}


def _scripts() -> list[tuple[str, str, str]]:
    """(where, interpreter, script) of every inline script in infra/'s containers: `python -c` and `sh -c`."""
    found = []
    for name, template in _pod_templates():
        for container in _containers(template):
            command = container.get("command", []) + container.get("args", [])
            if len(command) >= 3 and command[-2] == "-c":
                found.append((f"{name}:{container['name']}", Path(command[0]).name, command[-1]))
    return found


@pytest.mark.parametrize("where, interpreter, script", _scripts(), ids=[w for w, _, _ in _scripts()])
def test_inline_scripts_parse(where: str, interpreter: str, script: str) -> None:
    if interpreter == "python":
        compile(script, where, "exec")
    else:
        result = subprocess.run([shutil.which("bash") or "sh", "-n", "-c", script], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr


def test_credentials_come_only_from_secrets_with_placeholder_values() -> None:
    for name, template in _pod_templates():
        for container in _containers(template):
            for var in container.get("env", []):
                if any(word in var["name"] for word in ("PASSWORD", "SECRET", "TOKEN", "ACCESS_KEY")):
                    assert "secretKeyRef" in var.get("valueFrom", {}), f"{name}: {var['name']} is not from a Secret"
            for arg in container.get("command", []) + container.get("args", []):
                for url in re.findall(r"\w+://[^\s\"']+", arg):
                    password = urlsplit(url).password
                    assert password is None or password.startswith("$"), f"{name}: password in {url}"
    secrets = [d for _, d in K8S_DOCS if d["kind"] == "Secret"]
    assert secrets
    for secret in secrets:
        assert "data" not in secret
        assert all(v.startswith("REPLACE_ME") for v in secret["stringData"].values()), secret["metadata"]["name"]
    # ConfigMaps hold configuration, never a credential
    for _, doc in K8S_DOCS:
        if doc["kind"] == "ConfigMap":
            for key, value in doc["data"].items():
                assert not re.search(r"(password|secret)\s*[=:]", value, flags=re.I), (doc["metadata"]["name"], key)


def _secret_refs() -> dict[tuple[str, str], set[str]]:
    """{(Secret, key): names of the pod templates whose containers read it}"""
    refs: dict[tuple[str, str], set[str]] = {}
    for name, template in _pod_templates():
        for container in _containers(template):
            for var in container.get("env", []):
                if ref := var.get("valueFrom", {}).get("secretKeyRef"):
                    refs.setdefault((ref["name"], ref["key"]), set()).add(name)
    return refs


def test_every_secret_reference_resolves_and_readme_creates_it() -> None:
    keys = {(d["metadata"]["name"], k) for _, d in K8S_DOCS if d["kind"] == "Secret" for k in d["stringData"]}
    refs = set(_secret_refs())
    assert refs and refs <= keys, refs - keys
    assert keys <= refs, f"example Secret keys nothing reads: {keys - refs}"
    # infra/README.md, step 3, creates every Secret with every key
    created = set()
    for command in re.findall(r"kubectl -n vgg create secret generic (\S+)((?:.*\\\n)*.*)", README):
        created |= {(command[0], key) for key in re.findall(r"--from-literal=([\w-]+)=", command[1])}
    assert refs <= created, f"README step 3 does not create {refs - created}"


def test_mlflow_has_s3_credentials_of_its_own_not_minios_root() -> None:
    readers = _secret_refs()
    root = {key: pods for key, pods in readers.items() if key[0] == "mlflow-minio-root"}
    assert root and set().union(*root.values()) == {"mlflow/minio.yaml:Deployment/mlflow-minio",
                                                   "mlflow/minio.yaml:Job/mlflow-bucket"}
    (server,) = _template("mlflow/mlflow.yaml:Deployment/mlflow")["spec"]["containers"]
    env = _env(server)
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"] == {"name": "mlflow-s3", "key": "access-key"}
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "mlflow-s3", "key": "secret-key"}
    # The setup Job creates that user from the same Secret and attaches the bucket's policy to it
    (setup,) = _template("mlflow/minio.yaml:Job/mlflow-bucket")["spec"]["containers"]
    job_env = _env(setup)
    assert job_env["S3_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "mlflow-s3", "key": "access-key"}
    script = setup["command"][-1]
    assert 'mc admin user add minio "$S3_ACCESS_KEY" "$S3_SECRET_KEY"' in script
    assert 'mc admin policy attach minio "$BUCKET" --user "$S3_ACCESS_KEY"' in script
    bucket = urlsplit(_mlflow_args()["artifacts-destination"]).netloc
    assert job_env["BUCKET"]["value"] == bucket


def test_mlflows_s3_policy_reaches_its_bucket_and_nothing_else() -> None:
    (setup,) = _template("mlflow/minio.yaml:Job/mlflow-bucket")["spec"]["containers"]
    path = re.search(r"mc admin policy create minio \"\$BUCKET\" (\S+)", setup["command"][-1])[1]
    (mount,) = [m for m in setup["volumeMounts"] if m["mountPath"] == str(Path(path).parent)]
    (volume,) = [v for v in _template("mlflow/minio.yaml:Job/mlflow-bucket")["spec"]["volumes"]
                 if v["name"] == mount["name"]]
    policy = json.loads(_one("ConfigMap", volume["configMap"]["name"])["data"][Path(path).name])
    bucket = urlsplit(_mlflow_args()["artifacts-destination"]).netloc
    assert policy["Statement"]
    for statement in policy["Statement"]:
        assert statement["Effect"] == "Allow"
        assert set(statement["Resource"]) <= {f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"}, statement
        for action in statement["Action"]:
            assert action.startswith("s3:") and "*" not in action, action
            assert not re.match(r"s3:(Create|Delete|Put)Bucket", action), action  # objects only, not the bucket
    actions = {a for s in policy["Statement"] for a in s["Action"]}
    assert {"s3:PutObject", "s3:GetObject", "s3:ListBucket", "s3:DeleteObject"} <= actions  # what MLflow does


# --- pod security: every container non-root, unprivileged, on a read-only root -------------------------------

RESTRICTED_VOLUME_TYPES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                           "projected", "secret"}
# Containers that keep a writable root file system, with the reason: none
WRITABLE_ROOT: dict[str, str] = {}


def _restricted_violations(template: dict) -> list[str]:
    """What the "restricted" Pod Security Standard (Kubernetes 1.33, which namespace.yaml enforces) refuses in a
    pod, rule by rule as the admission plugin checks it; [] when it admits the pod."""
    spec = template["spec"]
    pod = spec.get("securityContext", {})
    out = [f"{key}: true" for key in ("hostNetwork", "hostPID", "hostIPC") if spec.get(key)]
    out += [f"volume {v['name']}: {kind}" for v in spec.get("volumes", []) for kind in v
            if kind != "name" and kind not in RESTRICTED_VOLUME_TYPES]
    out += ["pod sysctls"] * bool(pod.get("sysctls"))
    containers = spec["containers"] + spec.get("initContainers", []) + spec.get("ephemeralContainers", [])
    for c in containers:
        sc, name = c.get("securityContext", {}), c["name"]
        capabilities = sc.get("capabilities", {})
        if sc.get("privileged"):
            out.append(f"{name}: privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            out.append(f"{name}: allowPrivilegeEscalation is not false")
        if "ALL" not in capabilities.get("drop", []):
            out.append(f"{name}: capabilities not dropped (ALL)")
        if set(capabilities.get("add", [])) - {"NET_BIND_SERVICE"}:
            out.append(f"{name}: capabilities added {capabilities['add']}")
        if sc.get("runAsNonRoot", pod.get("runAsNonRoot")) is not True:
            out.append(f"{name}: runAsNonRoot is not true")
        if sc.get("runAsUser", pod.get("runAsUser")) == 0:
            out.append(f"{name}: runAsUser 0")
        if sc.get("seccompProfile", pod.get("seccompProfile", {})).get("type") not in ("RuntimeDefault", "Localhost"):
            out.append(f"{name}: seccompProfile is neither RuntimeDefault nor Localhost")
        if sc.get("procMount", "Default") != "Default":
            out.append(f"{name}: procMount")
        if any("hostPort" in port for port in c.get("ports", [])):
            out.append(f"{name}: hostPort")
    return out


@pytest.mark.parametrize("name, template", _pod_templates(), ids=[n for n, _ in _pod_templates()])
def test_every_pod_meets_the_restricted_pod_security_profile(name: str, template: dict) -> None:
    assert _restricted_violations(template) == []


def test_the_restricted_check_refuses_what_the_profile_refuses() -> None:
    template = copy.deepcopy(_template("mlflow/mlflow.yaml:Deployment/mlflow"))
    template["spec"]["containers"][0]["securityContext"].pop("allowPrivilegeEscalation")
    template["spec"]["initContainers"][0]["securityContext"]["capabilities"] = {"add": ["SYS_ADMIN"]}
    template["spec"]["securityContext"]["runAsUser"] = 0
    template["spec"]["securityContext"].pop("seccompProfile")
    template["spec"]["volumes"].append({"name": "host", "hostPath": {"path": "/"}})
    violations = "\n".join(_restricted_violations(template))
    for expected in ("allowPrivilegeEscalation", "capabilities not dropped", "capabilities added", "runAsUser 0",
                     "seccompProfile", "hostPath"):
        assert expected in violations, violations


def test_the_namespace_enforces_the_restricted_profile() -> None:
    labels = _one("Namespace", "vgg")["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
    assert labels["pod-security.kubernetes.io/enforce-version"] == f"v{K8S_VERSION.rsplit('.', 1)[0]}"


@pytest.mark.parametrize("name, template", _pod_templates(), ids=[n for n, _ in _pod_templates()])
def test_containers_run_as_their_images_user_on_a_read_only_root(name: str, template: dict) -> None:
    spec = template["spec"]
    pod = spec["securityContext"]
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    for _, doc in K8S_DOCS:  # a StatefulSet's claims are volumes of its pods
        if doc["kind"] == "StatefulSet" and doc["spec"]["template"] is template:
            claims = doc["spec"]["volumeClaimTemplates"]
            volumes |= {claim["metadata"]["name"]: {"persistentVolumeClaim": {}} for claim in claims}
    for container in _containers(template):
        sc = container["securityContext"]
        where = f"{name}:{container['name']}"
        uid = IMAGE_USER[container["image"].split("@")[0]]  # by tag, whether or not a digest follows
        assert (sc.get("runAsUser", pod.get("runAsUser")), sc.get("runAsGroup", pod.get("runAsGroup"))) == (uid, uid)
        assert sc.get("readOnlyRootFilesystem") is True or where in WRITABLE_ROOT, f"{where}: writable root"
        mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
        assert set(mounts.values()) <= set(volumes), f"{where}: mounts a volume the pod lacks"
        if container in spec["containers"]:  # a read-only root leaves /tmp to a volume of the pod
            assert "emptyDir" in volumes[mounts["/tmp"]], f"{where}: no writable /tmp"
    if any("persistentVolumeClaim" in v for v in volumes.values()):
        assert pod["fsGroup"] == pod["runAsGroup"]  # the volume is writable by the pod's group
        assert pod["fsGroupChangePolicy"] == "OnRootMismatch"


# --- network policies ------------------------------------------------------------------------------------------

POLICIES = [d for _, d in K8S_DOCS if d["kind"] == "NetworkPolicy"]
RAY_TEMPLATES = {n for n, _ in _pod_templates() if n.startswith("kuberay/") and not n.endswith(":submitter")}
KUBERAY_OPERATOR = "namespace kuberay-system, pods app.kubernetes.io/component=kuberay-operator"


def _selects(selector: dict, labels: dict) -> bool:
    """Whether a Kubernetes label selector matches these labels ({} matches everything)."""
    if any(labels.get(key) != value for key, value in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        key, values = expression["key"], expression.get("values", [])
        present = {"In": key in labels and labels[key] in values, "NotIn": labels.get(key) not in values,
                   "Exists": key in labels, "DoesNotExist": key not in labels}[expression["operator"]]
        if not present:
            return False
    return True


def _labels(name: str) -> dict:
    return _template(name)["metadata"].get("labels", {})


def _policies_for(name: str, kind: str) -> list[dict]:
    labels = _labels(name)
    return [p for p in POLICIES if kind in p["spec"]["policyTypes"] and _selects(p["spec"]["podSelector"], labels)]


def _peers(peer: dict) -> set[str]:
    """The pod templates of infra/ a NetworkPolicy peer matches, or a description of a peer outside them."""
    if "ipBlock" in peer:
        return {f"ipBlock {peer['ipBlock']}"}
    if "namespaceSelector" in peer:
        namespace = peer["namespaceSelector"].get("matchLabels", {}).get("kubernetes.io/metadata.name", "*")
        pods = ",".join(f"{k}={v}" for k, v in peer.get("podSelector", {}).get("matchLabels", {}).items())
        return {f"namespace {namespace}, pods {pods or '*'}"}
    return {n for n, _ in _pod_templates() if _selects(peer["podSelector"], _labels(n))}


def _admitted(name: str) -> set[str]:
    """Every peer the policies selecting this pod template admit to it (any port)."""
    admitted: set[str] = set()
    for policy in _policies_for(name, "Ingress"):
        for rule in policy["spec"].get("ingress", []):
            if not rule.get("from"):
                admitted.add("everyone")
            for peer in rule.get("from", []):
                admitted |= _peers(peer)
    return admitted


def test_the_servers_admit_exactly_their_clients() -> None:
    mlflow, users = "mlflow/mlflow.yaml:Deployment/mlflow", "mlflow/mlflow.yaml:Job/mlflow-users"
    submitter = "kuberay/rayjob.yaml:RayJob/vgg-paper:submitter"
    expected = {
        mlflow: RAY_TEMPLATES | {users},
        "mlflow/postgres.yaml:StatefulSet/mlflow-postgres": {mlflow},
        "mlflow/minio.yaml:Deployment/mlflow-minio": {mlflow, "mlflow/minio.yaml:Job/mlflow-bucket"},
        **{ray: RAY_TEMPLATES | {submitter, KUBERAY_OPERATOR} for ray in RAY_TEMPLATES},
    }
    assert len(RAY_TEMPLATES) == 4
    for name, _ in _pod_templates():
        assert _policies_for(name, "Ingress"), f"{name}: no ingress policy selects it (it admits everyone)"
        assert _admitted(name) == expected.get(name, set()), name


def test_policy_ports_are_the_servers_ports() -> None:
    def ports(policy_name: str) -> list[set[int]]:
        (policy,) = [p for p in POLICIES if p["metadata"]["name"] == policy_name]
        return [{port["port"] for port in rule.get("ports", [])} for rule in policy["spec"]["ingress"]]

    assert ports("mlflow") == [{5000}]
    assert ports("mlflow-postgres") == [{5432}]
    assert ports("mlflow-minio") == [{9000}]
    assert ports("ray") == [set(), {8265}, {8265, 10001}]  # Ray pods among themselves: every port


def test_every_selector_in_a_policy_matches_pods_of_infra() -> None:
    for policy in POLICIES:
        selector = policy["spec"]["podSelector"]
        assert any(_selects(selector, _labels(n)) for n, _ in _pod_templates()), policy["metadata"]["name"]
        for rule in policy["spec"].get("ingress", []):
            for peer in rule.get("from", []):
                assert _peers(peer), f"{policy['metadata']['name']}: {peer} matches nothing"


def test_the_kuberay_operator_peer_is_the_namespace_the_readme_installs_it_in() -> None:
    assert "--namespace kuberay-system --create-namespace" in README
    (policy,) = [p for p in POLICIES if p["metadata"]["name"] == "ray"]
    assert {KUBERAY_OPERATOR} == {s for rule in policy["spec"]["ingress"] for peer in rule["from"]
                                  for s in _peers(peer) if s.startswith("namespace")}


def _reaches(rules: list[dict], address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Whether egress rules let a pod connect to an address outside the cluster (a node-local service)."""
    for rule in rules:
        if not rule.get("to"):
            return True  # no `to`: every destination
        for peer in rule["to"]:
            block = peer.get("ipBlock")
            if block and address.version == ipaddress.ip_network(block["cidr"]).version and \
                    address in ipaddress.ip_network(block["cidr"]) and \
                    not any(address in ipaddress.ip_network(e) for e in block.get("except", [])):
                return True
    return False


def test_no_pod_can_reach_the_cloud_metadata_address() -> None:
    for name, _ in _pod_templates():
        policies = _policies_for(name, "Egress")
        assert policies, f"{name}: no egress policy selects it (it reaches everything)"
        rules = [rule for policy in policies for rule in policy["spec"].get("egress", [])]
        assert rules, f"{name}: no egress at all"
        assert not _reaches(rules, METADATA_V4) and not _reaches(rules, METADATA_V6), name
        assert _reaches(rules, ipaddress.ip_address("1.1.1.1"))  # the rest of the world stays reachable


def test_the_metadata_check_sees_a_rule_that_reaches_it() -> None:
    open_rule = {"to": [{"ipBlock": {"cidr": "169.254.0.0/16"}}]}
    assert _reaches([open_rule], METADATA_V4)
    assert _reaches([{"ports": [{"port": 80}]}], METADATA_V4)
    assert not _reaches([{"to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": ["169.254.169.254/32"]}}]}], METADATA_V4)


def test_the_ray_pods_have_a_policy_of_their_own() -> None:
    (policy,) = [p for p in POLICIES if p["metadata"]["name"] == "ray"]
    assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
    assert {n for n, _ in _pod_templates() if _selects(policy["spec"]["podSelector"], _labels(n))} == RAY_TEMPLATES
    assert not _reaches(policy["spec"]["egress"], METADATA_V4) and not _reaches(policy["spec"]["egress"], METADATA_V6)


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


def test_launcher_head_puts_rays_storage_on_the_efs_volume_and_says_so() -> None:
    config = yaml.safe_load(LAUNCHER.read_text())
    (start,) = [c for c in config["head_start_ray_commands"] if "ray start --head" in c]
    before = start.split("ray start --head")[0]  # variables exported to `ray start`, hence to the job drivers
    storage = Path(re.search(rf"\b{STORAGE_ENV}=(\S+)", before).group(1))
    assert storage.is_relative_to("/data") and storage != Path("/data")
    assert click.BOOL.convert(re.search(rf"\b{STORAGE_SHARED_ENV}=(\S+)", before).group(1), None, None) is True
    assert any("mount -t nfs4" in c and " /data;" in c for c in config["initialization_commands"])  # on every node


def _job_submissions() -> list[tuple[str, str]]:
    """(file, command) of every `ray job submit` example in the docs, continuation lines joined."""
    found = []
    for path in [ROOT / "README.md", INFRA / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            if "ray job submit" in line and line.startswith("    ") and " -- " in line + " ":
                command = line
                while command.endswith("\\"):
                    i += 1
                    command = command[:-1] + lines[i].strip()
                found.append((str(path.relative_to(ROOT)), " ".join(command.split())))
    return found


def test_every_ray_job_submit_example_that_trains_sets_rays_storage() -> None:
    trains = [(where, c) for where, c in _job_submissions() if re.search(r"vgg (train|tune)\b|protocol\.sh", c)]
    assert len(trains) >= 6, _job_submissions()  # README, docs/training.md and infra/README.md each have some
    for where, command in trains:
        entrypoint = command.split(" -- ", 1)[1]
        if "protocol.sh" in entrypoint:  # the stages DVC starts read the environment
            assert re.search(rf"\benv .*\b{STORAGE_ENV}=/\S+ .*\b{STORAGE_SHARED_ENV}=1 .*protocol\.sh", entrypoint), \
                (where, command)
        else:
            assert re.search(r"--storage /\S+", entrypoint) and "--storage-shared" in entrypoint, (where, command)


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


# --- the protocol through `ray job submit`, on the shared two-node cluster ---------------------------------------


@pytest.fixture(scope="module")
def protocol_source(tmp_path_factory, tiny_params) -> Path:
    """A git checkout of this project with the tiny profile active, one epoch per stage: what VGG_SOURCE names."""
    from tests.conftest import make_project

    env = {**os.environ, "GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@example.invalid",
           "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@example.invalid"}
    return make_project(tmp_path_factory.mktemp("protocol-source"), tiny_params, env, max_epochs=1)


def _submit_protocol(ray_cluster: dict, tmp_path: Path, source: Path, *, shared: str) -> subprocess.CompletedProcess:
    """`ray job submit` of infra/protocol.sh as infra/README.md's step 8 does it, with the test's paths and the
    tiny profile's generated data (VGG_RAW empty)."""
    entrypoint = ["env", f"VGG_SOURCE={source}", "VGG_PROFILE=tiny", "VGG_RAW=", f"VGG_WORK_ROOT={tmp_path / 'work'}",
                  f"VGG_DVC_CACHE={tmp_path / 'cache'}", f"{STORAGE_ENV}={tmp_path / 'ray-results'}",
                  f"{STORAGE_SHARED_ENV}={shared}", "bash", str(INFRA / "protocol.sh")]
    submit = [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", ray_cluster["dashboard"], "--",
              *entrypoint]
    env = {**os.environ, "PATH": _path(), "RAY_USAGE_STATS_ENABLED": "0"}
    for _ in range(30):  # the head's job agent comes up some seconds after `ray start` returns
        result = subprocess.run(submit, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=2400)
        if "No available agent to submit job" not in result.stdout + result.stderr:
            return result
        time.sleep(5)
    return result


def _workspace(tmp_path: Path, source: Path) -> Path:
    commit = subprocess.run(["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True,
                            check=True).stdout.strip()
    return tmp_path / "work" / commit[:12]


@pytest.mark.slow
@pytest.mark.protocol
def test_the_submitted_protocol_stops_before_any_stage_on_storage_not_declared_shared(ray_cluster, protocol_source,
                                                                                     tmp_path):
    result = _submit_protocol(ray_cluster, tmp_path, protocol_source, shared="0")
    assert result.returncode != 0 and "failed" in result.stdout, result.stdout[-3000:]
    assert (f"error: --storage {tmp_path / 'ray-results'}: the Ray cluster has 2 nodes and each writes checkpoints "
            "there, but the path is not declared shared") in result.stdout
    workspace = _workspace(tmp_path, protocol_source)
    assert not (workspace / "data").exists() and not (tmp_path / "ray-results").exists()  # no stage ran


@pytest.mark.slow
@pytest.mark.protocol
def test_ray_job_submit_runs_the_whole_protocol_on_two_nodes(ray_cluster, protocol_source, tmp_path):
    """infra/protocol.sh as the RayJob runs it: a workspace cloned from the source, `dvc exp run` of every stage,
    each `vgg train` a Ray Train run on the cluster with its checkpoints in VGG_RAY_STORAGE; the job's outcome is the
    report it wrote."""
    result = _submit_protocol(ray_cluster, tmp_path, protocol_source, shared="1")
    assert result.returncode == 0 and "succeeded" in result.stdout, result.stdout[-3000:] + result.stderr[-2000:]
    workspace = _workspace(tmp_path, protocol_source)
    metrics = json.loads((workspace / "reports" / "tiny" / "metrics.json").read_text())
    models = {"A": ["low"], "A-LRN": ["low"], "B": ["low"], **{c: ["low", "high", "jitter"] for c in "CDE"}}
    rows = {f"{config}/{kind}" for config, kinds in models.items() for kind in kinds}
    assert set(metrics["table3"]) == rows
    assert all(0.0 <= metrics["table3"][row]["top1_err"] <= 100.0 for row in rows)
    assert {"D+E/dense", "D+E/multicrop", "D+E/dense+multicrop"} <= set(metrics["table6"])
    assert "Table 6" in (workspace / "reports" / "tiny" / "report.md").read_text()
    # Every training stage ran on Ray Train with its run state in VGG_RAY_STORAGE, and its model records the kind
    # of its training scale.
    runs = sorted(p.name for p in (tmp_path / "ray-results").iterdir() if p.is_dir())
    assert len(runs) == 12 and all(name.startswith("tiny-") for name in runs), runs
    from vgg.models import checkpoint

    for config, kinds in models.items():
        for kind in kinds:
            assert checkpoint.read_header(workspace / "runs" / "tiny" / f"{config}-{kind}.pt")["scale_kind"] == kind
