"""`alignlib k8s JOB.yaml`: the Kubernetes objects that run one job spec on KubeRay.

In: a job spec (and `key=value` overrides). Out: YAML documents for `kubectl apply -f`:
- a ConfigMap holding the validated spec, mounted on the Ray head at /etc/alignlib/job.yaml;
- a NetworkPolicy letting only alignlib pods (and the KubeRay operator, on the dashboard port) reach Ray;
- a RayJob whose entrypoint is `python -m alignlib run /etc/alignlib/job.yaml`, with its own
  autoscaling RayCluster: a CPU-only head and worker groups sized from what the stages ask for.

    alignlib k8s jobs/dpo-zero3-8b.yaml -o dpo.yaml && kubectl apply -f dpo.yaml

Sizing: stages run one after another, so a group's maxReplicas is the largest number of pods any one
stage needs, never the sum. Every group starts at 0 pods; the Ray autoscaler adds pods while actors,
placement groups or Train workers wait for resources, and removes them when idle. The pod settings
(security context, secrets, volumes) are the same as in k8s/base/raycluster.yaml; a test keeps them equal.
"""

from __future__ import annotations

import math
import posixpath
import re
from dataclasses import dataclass, field
from typing import Any

import yaml

from alignlib.spec import JobSpec, SpecError, apply_overrides, parse_spec
from alignlib.stages import demands
from alignlib.uri import is_uri

RAY_VERSION = "2.60.0"  # the ray in cluster/Dockerfile's base image
IMAGE = "alignlib:latest"
SHARED = "/mnt/shared"  # the ReadWriteMany volume (k8s/base/pvc.yaml) every pod mounts
APP_DIR = "/app"  # the repository inside the image: relative data paths resolve here
SPEC_DIR = "/etc/alignlib"
SPEC_FILE = "job.yaml"
PVC = "alignlib-shared"
# With an object-store output_dir there is no shared volume: each pod caches models (hub downloads, exports it
# loads) on a volume of its own.
CACHE = "/cache"
HF_SECRET = "alignlib-hf"  # key `token`: Hugging Face token for gated models (optional)
STORAGE_SECRET = "alignlib-storage"  # object-store credentials as env vars, e.g. AWS_ACCESS_KEY_ID (optional)
RAY_AUTH_SECRET = "alignlib-ray-auth"  # key `auth_token`: Ray's token; required, so Ray never runs open
PART_OF = {"app.kubernetes.io/part-of": "alignlib"}
MAX_NAME = 47  # KubeRay appends suffixes to a RayJob's name for its cluster and submitter

DEFAULT_DEADLINE_S = 86_400
DEFAULT_RETRIES = 2
DEFAULT_TTL_S = 600


@dataclass(frozen=True)
class PodShape:
    """A worker pod: KubeRay passes its limits to `ray start` as --num-cpus/--num-gpus/--memory."""

    group: str
    cpu: int
    memory_gi: int
    gpu: int
    shm_gi: int  # /dev/shm (memory-backed): Ray's object store, vLLM and NCCL live here
    idle_timeout_s: int


GPU_1 = PodShape("gpu-1", cpu=8, memory_gi=64, gpu=1, shm_gi=16, idle_timeout_s=600)
GPU_8 = PodShape("gpu-8", cpu=64, memory_gi=768, gpu=8, shm_gi=192, idle_timeout_s=600)
CPU = PodShape("cpu", cpu=8, memory_gi=32, gpu=0, shm_gi=8, idle_timeout_s=300)
SHAPES = (CPU, GPU_1, GPU_8)


@dataclass
class WorkerGroup:
    shape: PodShape
    max_replicas: int = 0
    reasons: list[str] = field(default_factory=list)


def plan_groups(spec: JobSpec, source: str = "<spec>", wanted: list | None = None) -> list[WorkerGroup]:
    """Worker groups and their maxReplicas; raises SpecError when an actor fits no pod shape.

    `wanted`: the requests to size for; by default every enabled stage's peak request (alignlib.stages).
    """
    groups = {s.group: WorkerGroup(s) for s in SHAPES}
    problems: dict[str, str] = {}  # field -> problem: eval's engines repeat generate's and score's settings
    for d in demands(spec) if wanted is None else wanted:
        gpus, cpus = d.per_actor.get("GPU", 0.0), d.per_actor.get("CPU", 0.0)
        custom = sorted(set(d.per_actor) - {"CPU", "GPU", "memory"})
        if custom:
            problems.setdefault(d.field, f"{d.field}: no worker group offers the custom resource(s) {custom}; "
                                         "on Kubernetes ask for CPU/GPU only")  # fmt: skip
            continue
        # ZeRO-3 (or any training) on 8+ GPUs goes to 8-GPU pods: NVLink inside a node, not the network.
        if gpus > 1 or (d.stage == "train" and gpus and d.count * gpus >= GPU_8.gpu):
            shape = GPU_8
        else:
            shape = GPU_1 if gpus else CPU
        if gpus > shape.gpu or cpus > shape.cpu:
            hint = "lower it or split the model (tensor_parallel_size <= 8)" if gpus > shape.gpu else "lower it"
            problems.setdefault(
                d.field,
                f"{d.field}: one {d.stage} actor asks for {_fmt(d.per_actor)}, more than the largest "
                f"pod ({shape.gpu} GPU, {shape.cpu} CPU); {hint}",
            )
            continue
        per_pod = min(shape.gpu // gpus if gpus else math.inf, shape.cpu // cpus if cpus else math.inf)
        pods = math.ceil(d.count / per_pod) if per_pod != math.inf else 1
        group = groups[shape.group]
        group.max_replicas = max(group.max_replicas, pods)
        group.reasons.append(f"{d.stage}: {d.count} x {_fmt(d.per_actor)}")
    if problems:
        raise SpecError(source, list(problems.values()))
    # CPU-only steps (prompt encoding, function rewards, export) of a GPU job get a CPU pod rather
    # than waking a GPU pod: the head runs no tasks (num-cpus 0).
    groups[CPU.group].max_replicas = max(groups[CPU.group].max_replicas, 1)
    return [g for g in groups.values() if g.max_replicas > 0]


def _fmt(resources: dict[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(resources.items())) + "}"


# -- pods --------------------------------------------------------------------------------------

POD_SECURITY = {
    "runAsNonRoot": True,
    "runAsUser": 1000,  # the image's "ray" user
    "runAsGroup": 100,
    "fsGroup": 100,
    "fsGroupChangePolicy": "OnRootMismatch",  # no recursive chown of the model cache on every start
    "seccompProfile": {"type": "RuntimeDefault"},
}
CONTAINER_SECURITY = {
    "privileged": False,
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},  # GPUs come from the device plugin, not from privileges
}


def ray_env(object_store: bool = False) -> list[dict[str, Any]]:
    """Environment of every Ray container: model cache on the shared volume (or the pod's own cache volume),
    the hub token by reference."""
    env = [
        {"name": "HF_HOME", "value": f"{CACHE if object_store else SHARED}/hf"},
        {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": HF_SECRET, "key": "token", "optional": True}}},
    ]
    if object_store:
        env.append({"name": "ALIGNLIB_CACHE", "value": f"{CACHE}/alignlib"})
    return env


def ray_env_from(object_store: bool = False) -> list[dict[str, Any]]:
    """The object store's credentials, only ever by reference; required when output_dir is in the store."""
    return [{"secretRef": {"name": STORAGE_SECRET, "optional": not object_store}}]


def _data_volume(object_store: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """(mount, volume): the shared volume, or, with an object-store output_dir, the pod's own model cache."""
    if object_store:
        return {"name": "cache", "mountPath": CACHE}, {"name": "cache", "emptyDir": {}}
    return {"name": "shared", "mountPath": SHARED}, {"name": "shared", "persistentVolumeClaim": {"claimName": PVC}}


def _resources(cpu: int, memory_gi: int, gpu: int = 0) -> dict[str, Any]:
    amounts: dict[str, Any] = {"cpu": str(cpu), "memory": f"{memory_gi}Gi"}
    if gpu:
        amounts["nvidia.com/gpu"] = gpu
    return {"requests": dict(amounts), "limits": dict(amounts)}


def worker_group(group: WorkerGroup, image: str, object_store: bool = False) -> dict[str, Any]:
    s = group.shape
    mount, volume = _data_volume(object_store)
    pod: dict[str, Any] = {
        # Autoscaler v2 replaces a failed worker pod itself; a restarted container would rejoin stale.
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,  # workers never call the Kubernetes API
        "securityContext": POD_SECURITY,
        "containers": [
            {
                "name": "ray-worker",
                "image": image,
                "imagePullPolicy": "IfNotPresent",
                "securityContext": CONTAINER_SECURITY,
                "resources": _resources(s.cpu, s.memory_gi, s.gpu),
                "env": ray_env(object_store),
                "envFrom": ray_env_from(object_store),
                "volumeMounts": [mount, {"name": "dshm", "mountPath": "/dev/shm"}],
            }
        ],
        "volumes": [volume, {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": f"{s.shm_gi}Gi"}}],
    }
    if s.gpu:
        pod["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    return {
        "groupName": s.group,
        "replicas": 0,
        "minReplicas": 0,
        "maxReplicas": group.max_replicas,
        "idleTimeoutSeconds": s.idle_timeout_s,
        "rayStartParams": {},
        "template": {"metadata": {"labels": dict(PART_OF)}, "spec": pod},
    }


def head_group(image: str, spec_configmap: str | None, serve_port: int | None = None,
               object_store: bool = False) -> dict[str, Any]:  # fmt: skip
    mount, volume = _data_volume(object_store)
    mounts, volumes = [mount], [volume]
    if spec_configmap:
        mounts.append({"name": "job-spec", "mountPath": SPEC_DIR, "readOnly": True})
        volumes.append({"name": "job-spec", "configMap": {"name": spec_configmap}})
    return {
        "serviceType": "ClusterIP",  # dashboard and job API reachable only inside the cluster
        # No tasks on the head: it runs GCS, the dashboard/job API and the `alignlib run` driver.
        "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0"},
        "template": {
            "metadata": {"labels": dict(PART_OF)},
            "spec": {
                # The head keeps its service account token: the autoscaler sidecar scales pods through it.
                "securityContext": POD_SECURITY,
                "containers": [
                    {
                        "name": "ray-head",
                        "image": image,
                        "imagePullPolicy": "IfNotPresent",
                        "securityContext": CONTAINER_SECURITY,
                        "ports": [
                            {"containerPort": 6379, "name": "gcs"},
                            {"containerPort": 8265, "name": "dashboard"},
                            # Serve's HTTP proxy runs on the head; KubeRay's serve Service targets this port.
                            *([{"containerPort": serve_port, "name": "serve"}] if serve_port else []),
                        ],
                        "resources": _resources(4, 16),
                        "env": ray_env(object_store),
                        "envFrom": ray_env_from(object_store),
                        "volumeMounts": mounts,
                    }
                ],
                "volumes": volumes,
            },
        },
    }


def cluster_spec(groups: list[WorkerGroup], image: str, spec_configmap: str | None = None,
                 serve_port: int | None = None, object_store: bool = False) -> dict[str, Any]:  # fmt: skip
    return {
        "rayVersion": RAY_VERSION,
        # Token auth from a Secret the user creates once (KubeRay >= 1.5.1 sets RAY_AUTH_MODE and
        # RAY_AUTH_TOKEN on every Ray container from it).
        "authOptions": {"mode": "token", "secretName": RAY_AUTH_SECRET},
        "enableInTreeAutoscaling": True,
        "autoscalerOptions": {
            "version": "v2",
            "upscalingMode": "Default",
            "idleTimeoutSeconds": 600,
            "securityContext": CONTAINER_SECURITY,
        },
        "headGroupSpec": head_group(image, spec_configmap, serve_port, object_store),
        "workerGroupSpecs": [worker_group(g, image, object_store) for g in groups],
    }


def submitter_pod(image: str) -> dict[str, Any]:
    """The pod running `ray job submit` (KubeRay fills in the command); it sends Ray's token."""
    return {
        "metadata": {"labels": dict(PART_OF)},
        "spec": {
            "restartPolicy": "Never",
            "automountServiceAccountToken": False,
            "securityContext": POD_SECURITY,
            "containers": [
                {
                    "name": "ray-job-submitter",
                    "image": image,
                    "imagePullPolicy": "IfNotPresent",
                    "securityContext": CONTAINER_SECURITY,
                    "resources": {
                        "requests": {"cpu": "500m", "memory": "1Gi"},
                        "limits": {"cpu": "1", "memory": "1Gi"},
                    },
                    "env": [
                        {"name": "RAY_AUTH_MODE", "value": "token"},
                        {
                            "name": "RAY_AUTH_TOKEN",
                            "valueFrom": {"secretKeyRef": {"name": RAY_AUTH_SECRET, "key": "auth_token"}},
                        },
                    ],
                }
            ],
        },
    }


def network_policy(serve_port: int | None = None) -> dict[str, Any]:
    """Ray's ports open to alignlib pods only, plus the operator polling job status on 8265; with `serve_port`,
    the serving port also to pods of the namespace that carry the label `alignlib/client: "true"`."""
    policy = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": "alignlib-ray", "labels": dict(PART_OF)},
        "spec": {
            "podSelector": {"matchLabels": dict(PART_OF)},
            "policyTypes": ["Ingress"],
            "ingress": [
                {"from": [{"podSelector": {"matchLabels": dict(PART_OF)}}]},
                {
                    "from": [
                        {
                            "namespaceSelector": {},
                            "podSelector": {"matchLabels": {"app.kubernetes.io/name": "kuberay-operator"}},
                        }
                    ],
                    "ports": [{"protocol": "TCP", "port": 8265}],
                },
            ],
        },
    }
    if serve_port:
        policy["spec"]["ingress"].append({"from": [{"podSelector": {"matchLabels": {"alignlib/client": "true"}}}],
                                          "ports": [{"protocol": "TCP", "port": serve_port}]})  # fmt: skip
    return policy


# -- the job -----------------------------------------------------------------------------------


def k8s_name(job_name: str, source: str = "<spec>") -> str:
    name = "alignlib-" + re.sub(r"[^a-z0-9-]+", "-", job_name.lower()).strip("-")
    if len(name) > MAX_NAME:
        raise SpecError(source, [f"name: {job_name!r} gives the RayJob name {name!r}, longer than {MAX_NAME} "
                                "characters; use a shorter job name (override name=...)"])  # fmt: skip
    return name


def cluster_paths(raw: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The spec as the cluster sees it (output_dir on the shared volume, or in an object store), and path problems."""
    raw = dict(raw)
    problems = []
    out = str(raw.get("output_dir", ""))
    if out.startswith("file://"):
        out = out.removeprefix("file://")
    object_store = is_uri(out)
    if object_store:
        pass  # every pod reaches it with the credentials of Secret STORAGE_SECRET
    elif out and not out.startswith("/"):
        raw["output_dir"] = posixpath.join(SHARED, out)  # runs/demo -> /mnt/shared/runs/demo
    elif out and not _under(out, SHARED):
        problems.append(f"output_dir: {out} is not on the shared volume every pod mounts ({SHARED}); "
                        f"set output_dir={SHARED}/runs/{raw.get('name', 'NAME')}")  # fmt: skip
    data = raw.get("data")
    path = str(data.get("path", "")) if isinstance(data, dict) else ""
    if object_store and path.startswith("/") and not _under(path, APP_DIR):
        problems.append(f"data.path: {path} is not in the image ({APP_DIR}); with output_dir in an object store "
                        "the pods share no volume, so the prompts must be in the image")  # fmt: skip
    elif path.startswith("/") and not (_under(path, SHARED) or _under(path, APP_DIR)):
        problems.append(f"data.path: {path} is not in the image ({APP_DIR}) nor on the shared volume ({SHARED}); "
                        f"copy the prompts to {SHARED}/data/ and point data.path there")  # fmt: skip
    return raw, problems


def _under(path: str, root: str) -> bool:
    path = posixpath.normpath(path)
    return path == root or path.startswith(root + "/")


class _BlockDumper(yaml.SafeDumper):
    """Multi-line strings (the spec in the ConfigMap, runtimeEnvYAML) as readable `|` blocks, no &anchors."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _str(dumper: yaml.SafeDumper, text: str):
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style="|" if "\n" in text else None)


_BlockDumper.add_representer(str, _str)


@dataclass
class Rendered:
    name: str
    spec: JobSpec
    groups: list[WorkerGroup]
    documents: list[dict[str, Any]]
    kind: str = "RayJob"

    @property
    def object_store(self) -> bool:
        return is_uri(self.spec.output_dir)

    def to_yaml(self) -> str:
        if self.kind == "RayService":
            head = [f"# alignlib k8s --serve: job {self.spec.name!r} -> RayService {self.name} (best-of-N on port "
                    f"{SERVE_PORT}, Service {self.name}-serve-svc); worker groups (max pods, from serve's replicas):"]  # fmt: skip
        else:
            head = [f"# alignlib k8s: job {self.spec.name!r} -> RayJob {self.name}",
                    f"# output_dir {self.spec.output_dir}; worker groups (max pods, from the stages' requests):"]  # fmt: skip
        head += [f"#   {g.shape.group} x{g.max_replicas}: {'; '.join(g.reasons) or 'CPU-only steps'}" for g in self.groups]
        if self.spec.generate.engine == "vllm" and not any(g.shape.gpu for g in self.groups):
            head += ["# Note: the image's vLLM is the CUDA build; a CPU-only job needs generate.engine=transformers"]
        if self.object_store:
            head += [f"# Needs: KubeRay >= 1.5.1, Secret {STORAGE_SECRET} (the object store's credentials as env vars: "
                     "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, and AWS_ENDPOINT_URL for a store other than AWS), "
                     f"Secret {RAY_AUTH_SECRET} (key auth_token); no shared volume."]  # fmt: skip
        else:
            head += [f"# Needs: KubeRay >= 1.5.1, PVC {PVC} (k8s/base/pvc.yaml), Secret {RAY_AUTH_SECRET} (key auth_token)."]
        body = yaml.dump_all(self.documents, Dumper=_BlockDumper, sort_keys=False, default_flow_style=False, width=120)
        return "\n".join(head) + "\n" + body


def cluster_spec_of(raw: Any, source: str, more_checks=None) -> tuple[dict[str, Any], JobSpec]:
    """The raw spec as the cluster sees it and the parsed spec; SpecError with every problem found."""
    if not isinstance(raw, dict):
        raise SpecError(source, ["the job spec must be a YAML mapping"])
    raw, problems = cluster_paths(raw)
    try:
        spec = parse_spec(raw, source)
    except SpecError as err:
        raise SpecError(source, problems + err.problems) from None
    problems += more_checks(spec) if more_checks else []
    if problems:
        raise SpecError(source, problems)
    return raw, spec


def render(raw: dict[str, Any], source: str = "<spec>", *, image: str = IMAGE, deadline_s: int = DEFAULT_DEADLINE_S,
           retries: int = DEFAULT_RETRIES, ttl_s: int = DEFAULT_TTL_S) -> Rendered:  # fmt: skip
    """A raw spec mapping (overrides applied) -> ConfigMap + NetworkPolicy + RayJob."""
    raw, spec = cluster_spec_of(raw, source)
    name = k8s_name(spec.name, source)
    groups = plan_groups(spec, source)
    configmap = f"{name}-spec"
    spec_text = f"# {source} as submitted by `alignlib k8s`\n" + yaml.safe_dump(raw, sort_keys=False)
    labels = {**PART_OF, "app.kubernetes.io/name": "alignlib", "alignlib/job": name.removeprefix("alignlib-")}
    documents = [
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": configmap, "labels": labels},
            "data": {SPEC_FILE: spec_text},
        },
        network_policy(),
        {
            "apiVersion": "ray.io/v1",
            "kind": "RayJob",
            "metadata": {"name": name, "labels": labels},
            "spec": {
                "entrypoint": f"python -m alignlib run {SPEC_DIR}/{SPEC_FILE}",
                "runtimeEnvYAML": f"working_dir: {APP_DIR}\n",
                "submissionMode": "K8sJobMode",
                # Deadline for the whole job, retries with a fresh cluster: complete stages are skipped and
                # training resumes from its last checkpoint, both on the shared volume (or in the object store).
                "activeDeadlineSeconds": deadline_s,
                "backoffLimit": retries,
                "submitterConfig": {"backoffLimit": retries},
                "submitterPodTemplate": submitter_pod(image),
                # The cluster goes when the job ends (success or failure), ttl_s later (time to read logs).
                "shutdownAfterJobFinishes": True,
                "ttlSecondsAfterFinished": ttl_s,
                "rayClusterSpec": cluster_spec(groups, image, configmap, object_store=is_uri(spec.output_dir)),
            },
        },
    ]
    return Rendered(name, spec, groups, documents)


SERVE_PORT = 8000


def serve_demands(spec: JobSpec) -> list:
    """What `alignlib serve` asks Ray for at most: the engine and reward replicas (their upper bounds)."""
    from alignlib.serving import GATEWAY_CPUS, engine_resources, reward_resources
    from alignlib.stages import Demand

    def most(replicas) -> int:
        return replicas if isinstance(replicas, int) else replicas[1]

    serve = spec.serve
    return [
        Demand("serve", "serve.engine.resources", most(serve.engine.replicas), dict(engine_resources(spec))),
        Demand("serve", "serve.reward.resources", most(serve.reward.replicas), dict(reward_resources(spec))),
        Demand("serve", "serve (gateway)", 1, {"CPU": GATEWAY_CPUS}),
    ]  # fmt: skip


def render_service(raw: dict[str, Any], source: str = "<spec>", *, image: str = IMAGE) -> Rendered:
    """A raw spec mapping (overrides applied) -> NetworkPolicy + RayService running `alignlib serve`'s
    application (alignlib.serving:app_builder) with the spec inline in serveConfigV2."""
    from alignlib.serving import preflight_spec

    raw, spec = cluster_spec_of(raw, source, preflight_spec)
    name = k8s_name(spec.name, source)
    groups = plan_groups(spec, source, serve_demands(spec))
    labels = {**PART_OF, "app.kubernetes.io/name": "alignlib", "alignlib/job": name.removeprefix("alignlib-")}
    serve_config = {
        "proxy_location": "HeadOnly",
        "http_options": {"host": "0.0.0.0", "port": SERVE_PORT},
        "applications": [{
            "name": "alignlib",
            "route_prefix": "/",
            "import_path": "alignlib.serving:app_builder",
            "args": {"spec_yaml": f"# {source} as submitted by `alignlib k8s --serve`\n"
                                  + yaml.safe_dump(raw, sort_keys=False)},
        }],
    }  # fmt: skip
    service = {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "serveConfigV2": yaml.dump(serve_config, Dumper=_BlockDumper, sort_keys=False, width=120),
            "rayClusterConfig": cluster_spec(groups, image, serve_port=SERVE_PORT, object_store=is_uri(spec.output_dir)),
        },
    }
    return Rendered(name, spec, groups, [network_policy(SERVE_PORT), service], kind="RayService")


def render_file(path: str, overrides: list[str], **options: Any) -> Rendered:
    from pathlib import Path

    from alignlib.spec import load_raw

    raw = load_raw(Path(path))
    if not isinstance(raw, dict):
        raise SpecError(str(path), ["the job spec must be a YAML mapping"])
    if options.pop("serve", False):
        return render_service(apply_overrides(raw, overrides), str(path), image=options.get("image", IMAGE))
    return render(apply_overrides(raw, overrides), str(path), **options)


# -- command line ------------------------------------------------------------------------------


def add_arguments(cmd) -> None:
    """Options of `alignlib k8s` (the subcommand itself is registered in cli.py)."""
    cmd.add_argument("-o", "--output", metavar="FILE", help="write the YAML here instead of stdout")
    cmd.add_argument("--image", default=IMAGE, help=f"container image of every pod (default {IMAGE})")
    cmd.add_argument("--deadline", type=int, default=DEFAULT_DEADLINE_S, metavar="SECONDS",
                     help=f"activeDeadlineSeconds of the RayJob (default {DEFAULT_DEADLINE_S})")  # fmt: skip
    cmd.add_argument("--serve", action="store_true",
                     help=f"render a RayService serving best-of-N answers (`alignlib serve`) on port {SERVE_PORT} "
                          "instead of the RayJob")  # fmt: skip
    cmd.add_argument("--retries", type=int, default=DEFAULT_RETRIES,
                     help=f"retries, each on a fresh cluster, resuming from complete stages (default {DEFAULT_RETRIES})")  # fmt: skip


def command(args) -> int:
    import sys
    from pathlib import Path

    if args.deadline < 1 or args.retries < 0:
        print("alignlib k8s: --deadline must be >= 1 and --retries >= 0", file=sys.stderr)
        return 2
    try:
        rendered = render_file(args.spec, args.overrides, image=args.image, deadline_s=args.deadline,
                               retries=args.retries, serve=args.serve)  # fmt: skip
    except SpecError as err:
        print(err, file=sys.stderr)
        return 2
    text = rendered.to_yaml()
    if args.output:
        Path(args.output).write_text(text)
        groups = ", ".join(f"{g.shape.group} x{g.max_replicas}" for g in rendered.groups)
        print(f"wrote {rendered.kind} {rendered.name} ({groups}) to {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0
