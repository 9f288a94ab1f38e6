"""The pods of every Ray cluster alignlib deploys, read from the manifests in alignlib/k8s/manifests/.

Those YAML files are the one place the pods are defined. `alignlib k8s` copies their templates into each job's
cluster and sets only what the job decides (image, maxReplicas, the spec's ConfigMap, the serve port, a cache
volume of each pod's own for an object-store output_dir); k8s/base holds copies of them for kustomize, written
by `python -m alignlib.k8s.base`. What the rest of alignlib needs to know about the pods (the image, the shared
volume, the Secrets, the pod shapes it sizes with) is read from the manifests too, so nothing here restates them.
"""

from __future__ import annotations

import copy
import posixpath
from dataclasses import dataclass
from importlib.resources import files
from typing import Any

import yaml

SPEC_DIR = "/etc/alignlib"  # the job spec's ConfigMap, mounted on the head
SPEC_FILE = "job.yaml"
# With an object-store output_dir there is no shared volume: each pod caches models (hub downloads, exports it
# loads) on a volume of its own.
CACHE = "/cache"
GPU = "nvidia.com/gpu"


def manifest_text(name: str) -> str:
    """alignlib/k8s/manifests/NAME as shipped inside the package."""
    return (files("alignlib.k8s") / "manifests" / name).read_text(encoding="utf-8")


def _plain(node: Any) -> Any:
    """A copy that shares no dict or list: YAML anchors (*pod-security, *ray-env) load as one shared object."""
    if isinstance(node, dict):
        return {key: _plain(value) for key, value in node.items()}
    if isinstance(node, list):
        return [_plain(value) for value in node]
    return node


def _load(name: str) -> dict[str, Any]:
    return _plain(yaml.safe_load(manifest_text(name)))


RAYCLUSTER = _load("raycluster.yaml")
RAYJOB = _load("rayjob.yaml")
NETWORK_POLICY = _load("networkpolicy.yaml")

_CLUSTER = RAYCLUSTER["spec"]
_HEAD_POD = _CLUSTER["headGroupSpec"]["template"]["spec"]
_HEAD = _HEAD_POD["containers"][0]
_WORKERS = {group["groupName"]: group for group in _CLUSTER["workerGroupSpecs"]}
_SHARED_VOLUME = next(v for v in _HEAD_POD["volumes"] if "persistentVolumeClaim" in v)

RAY_VERSION = str(_CLUSTER["rayVersion"])  # the ray in cluster/Dockerfile's base image
IMAGE = _HEAD["image"]
RAY_AUTH_SECRET = _CLUSTER["authOptions"]["secretName"]  # key `auth_token`: Ray's token; required
PVC = _SHARED_VOLUME["persistentVolumeClaim"]["claimName"]  # the ReadWriteMany volume of k8s/base/pvc.yaml
SHARED = next(m["mountPath"] for m in _HEAD["volumeMounts"] if m["name"] == _SHARED_VOLUME["name"])
# Object-store credentials as env vars, e.g. AWS_ACCESS_KEY_ID; optional unless output_dir is in the store.
STORAGE_SECRET = next(e["secretRef"]["name"] for e in _HEAD["envFrom"] if "secretRef" in e)
APP_DIR = yaml.safe_load(RAYJOB["spec"]["runtimeEnvYAML"])["working_dir"]  # the repository inside the image
PART_OF = dict(NETWORK_POLICY["spec"]["podSelector"]["matchLabels"])  # the label that lets a pod reach Ray


@dataclass(frozen=True)
class PodShape:
    """A worker group's pod as its container limits give it (KubeRay passes them to `ray start`)."""

    group: str
    cpu: int
    gpu: int


def _shape(group: str) -> PodShape:
    limits = _WORKERS[group]["template"]["spec"]["containers"][0]["resources"]["limits"]
    return PodShape(group, cpu=int(limits["cpu"]), gpu=int(limits.get(GPU, 0)))


SHAPES = tuple(_shape(group) for group in _WORKERS)
CPU, GPU_1, GPU_8 = (_shape(group) for group in ("cpu", "gpu-1", "gpu-8"))


def under(path: str, root: str) -> bool:
    path = posixpath.normpath(path)
    return path == root or path.startswith(root + "/")


def _set_image(pod: dict[str, Any], image: str) -> None:
    for container in pod["containers"]:
        container["image"] = image


def _own_cache(pod: dict[str, Any]) -> None:
    """For an object-store output_dir: no shared volume. The pod caches models on a volume of its own (what lived
    on the shared volume moves there, and ALIGNLIB_CACHE with it), and the store's Secret becomes required."""
    shared = _SHARED_VOLUME["name"]
    pod["volumes"] = [{"name": "cache", "emptyDir": {}} if v["name"] == shared else v for v in pod["volumes"]]
    for container in pod["containers"]:
        cache = {"name": "cache", "mountPath": CACHE}
        container["volumeMounts"] = [cache if m["name"] == shared else m for m in container["volumeMounts"]]
        env = container.setdefault("env", [])
        for var in env:
            if under(var.get("value", ""), SHARED):
                var["value"] = CACHE + var["value"].removeprefix(SHARED)
        env.append({"name": "ALIGNLIB_CACHE", "value": f"{CACHE}/alignlib"})
        for source in container.get("envFrom", []):
            if source.get("secretRef", {}).get("name") == STORAGE_SECRET:
                source["secretRef"]["optional"] = False


def worker_group(group: str, max_replicas: int, image: str, object_store: bool = False) -> dict[str, Any]:
    spec = copy.deepcopy(_WORKERS[group])
    spec["maxReplicas"] = max_replicas
    _set_image(spec["template"]["spec"], image)
    if object_store:
        _own_cache(spec["template"]["spec"])
    return spec


def head_group(
    image: str, spec_configmap: str | None = None, serve_port: int | None = None, object_store: bool = False
) -> dict[str, Any]:
    head = copy.deepcopy(_CLUSTER["headGroupSpec"])
    pod = head["template"]["spec"]
    container = pod["containers"][0]
    _set_image(pod, image)
    if spec_configmap:
        container["volumeMounts"].append({"name": "job-spec", "mountPath": SPEC_DIR, "readOnly": True})
        pod["volumes"].append({"name": "job-spec", "configMap": {"name": spec_configmap}})
    if serve_port:
        # Serve's HTTP proxy runs on the head; KubeRay's serve Service targets this port.
        container["ports"].append({"containerPort": serve_port, "name": "serve"})
    if object_store:
        _own_cache(pod)
    return head


def cluster_spec(
    max_replicas: dict[str, int],
    image: str,
    spec_configmap: str | None = None,
    serve_port: int | None = None,
    object_store: bool = False,
) -> dict[str, Any]:
    """The RayCluster spec of raycluster.yaml with the worker groups named in `max_replicas` (group -> pods)."""
    spec = copy.deepcopy(_CLUSTER)
    spec["headGroupSpec"] = head_group(image, spec_configmap, serve_port, object_store)
    spec["workerGroupSpecs"] = [worker_group(g, n, image, object_store) for g, n in max_replicas.items()]
    return spec


def submitter_pod(image: str) -> dict[str, Any]:
    """The pod running `ray job submit` (KubeRay fills in the command), as in rayjob.yaml; it sends Ray's token."""
    template = copy.deepcopy(RAYJOB["spec"]["submitterPodTemplate"])
    _set_image(template["spec"], image)
    return template


def network_policy(serve_port: int | None = None) -> dict[str, Any]:
    """networkpolicy.yaml, labelled; with `serve_port`, the serving port also open to pods of the namespace that
    carry the label `alignlib/client: "true"`."""
    policy = copy.deepcopy(NETWORK_POLICY)
    policy["metadata"]["labels"] = dict(PART_OF)
    if serve_port:
        client = {"podSelector": {"matchLabels": {"alignlib/client": "true"}}}
        policy["spec"]["ingress"].append({"from": [client], "ports": [{"protocol": "TCP", "port": serve_port}]})
    return policy
