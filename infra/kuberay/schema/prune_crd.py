"""Regenerate the pruned KubeRay CRD schemas that tests/test_infra.py validates raycluster.yaml and rayjob.yaml with.

    python infra/kuberay/schema/prune_crd.py KUBERAY_TAG path/to/ray.io_rayclusters.yaml path/to/ray.io_rayjobs.yaml

Inputs are ray-operator/config/crd/bases/ of the KubeRay release the cluster runs. The ray.io/v1 openAPIV3Schema is
kept field for field, except the subtrees that embed Kubernetes core types (pod templates, the head Service,
network policies, autoscaler container options): those become their bare type, so the files stay small. The test
validates every pod template against Kubernetes' own schema instead (kubernetes-validate).
"""

import json
import sys
from pathlib import Path

import yaml

# Keys whose values are Kubernetes core types (PodTemplateSpec, Service, container fields) inside the CRDs
CORE_TYPED = {
    "template",
    "submitterPodTemplate",
    "headService",
    "networkPolicy",
    "autoscalerOptions",
    "historyServerOptions",
    "gcsFaultToleranceOptions",
}


def prune(schema: dict) -> dict:
    out = {key: value for key, value in schema.items() if key not in ("properties", "items")}
    if "properties" in schema:
        out["properties"] = {
            name: ({"type": child["type"]} if name in CORE_TYPED else prune(child))
            for name, child in schema["properties"].items()
        }
    if "items" in schema:
        out["items"] = prune(schema["items"])
    return out


def main(*, tag: str, crd_paths: list[Path]) -> None:
    for path in crd_paths:
        crd = yaml.safe_load(path.read_text())
        (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        kind = crd["spec"]["names"]["kind"]
        schema = prune(version["schema"]["openAPIV3Schema"])
        schema["$comment"] = f"KubeRay {tag} {path.name}, ray.io/v1, pruned by prune_crd.py (Apache-2.0 upstream)"
        target = Path(__file__).with_name(f"{kind.lower()}.v1.json")
        target.write_text(json.dumps(schema, indent=1, sort_keys=True) + "\n")
        print(f"{target}: {len(target.read_text())} characters")


if __name__ == "__main__":
    main(tag=sys.argv[1], crd_paths=[Path(p) for p in sys.argv[2:]])
