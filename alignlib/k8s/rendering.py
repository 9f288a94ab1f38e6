"""The Kubernetes objects of one job spec: a RayJob (`render`) or a RayService (`render_service`), and their YAML."""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass
from typing import Any

import yaml

from alignlib.k8s.pods import (
    APP_DIR,
    IMAGE,
    PART_OF,
    PVC,
    RAY_AUTH_SECRET,
    SHARED,
    SPEC_DIR,
    SPEC_FILE,
    STORAGE_SECRET,
    cluster_spec,
    network_policy,
    submitter_pod,
    under,
)
from alignlib.k8s.sizing import WorkerGroup, plan_groups, serve_demands
from alignlib.spec import JobSpec, SpecError, parse_spec
from alignlib.uri import is_uri

MAX_NAME = 47  # KubeRay appends suffixes to a RayJob's name for its cluster and submitter
SERVE_PORT = 8000
DEFAULT_DEADLINE_S = 86_400
DEFAULT_RETRIES = 2
DEFAULT_TTL_S = 600


def k8s_name(job_name: str, source: str = "<spec>") -> str:
    name = "alignlib-" + re.sub(r"[^a-z0-9-]+", "-", job_name.lower()).strip("-")
    if len(name) > MAX_NAME:
        raise SpecError(
            source,
            [
                f"name: {job_name!r} gives the RayJob name {name!r}, longer than {MAX_NAME} characters; "
                "use a shorter job name (override name=...)"
            ],
        )
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
    elif out and not under(out, SHARED):
        problems.append(
            f"output_dir: {out} is not on the shared volume every pod mounts ({SHARED}); "
            f"set output_dir={SHARED}/runs/{raw.get('name', 'NAME')}"
        )
    data = raw.get("data")
    path = str(data.get("path", "")) if isinstance(data, dict) else ""
    if object_store and path.startswith("/") and not under(path, APP_DIR):
        problems.append(
            f"data.path: {path} is not in the image ({APP_DIR}); with output_dir in an object store "
            "the pods share no volume, so the prompts must be in the image"
        )
    elif path.startswith("/") and not (under(path, SHARED) or under(path, APP_DIR)):
        problems.append(
            f"data.path: {path} is not in the image ({APP_DIR}) nor on the shared volume ({SHARED}); "
            f"copy the prompts to {SHARED}/data/ and point data.path there"
        )
    return raw, problems


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
            head = [
                f"# alignlib k8s --serve: job {self.spec.name!r} -> RayService {self.name} (best-of-N on port "
                f"{SERVE_PORT}, Service {self.name}-serve-svc); worker groups (max pods, from serve's replicas):"
            ]
        else:
            head = [
                f"# alignlib k8s: job {self.spec.name!r} -> RayJob {self.name}",
                f"# output_dir {self.spec.output_dir}; worker groups (max pods, from the stages' requests):",
            ]
        head += [
            f"#   {g.shape.group} x{g.max_replicas}: {'; '.join(g.reasons) or 'CPU-only steps'}" for g in self.groups
        ]
        if self.spec.generate.engine == "vllm" and not any(g.shape.gpu for g in self.groups):
            head += ["# Note: the image's vLLM is the CUDA build; a CPU-only job needs generate.engine=transformers"]
        if self.object_store:
            head += [
                f"# Needs: KubeRay >= 1.5.1, Secret {STORAGE_SECRET} (the object store's credentials as env vars: "
                "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, and AWS_ENDPOINT_URL for a store other than AWS), "
                f"Secret {RAY_AUTH_SECRET} (key auth_token); no shared volume."
            ]
        else:
            head += [
                f"# Needs: KubeRay >= 1.5.1, PVC {PVC} (k8s/base/pvc.yaml), Secret {RAY_AUTH_SECRET} (key auth_token)."
            ]
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


def _pods(groups: list[WorkerGroup]) -> dict[str, int]:
    return {g.shape.group: g.max_replicas for g in groups}


def _labels(name: str) -> dict[str, str]:
    return {**PART_OF, "app.kubernetes.io/name": "alignlib", "alignlib/job": name.removeprefix("alignlib-")}


def render(
    raw: dict[str, Any],
    source: str = "<spec>",
    *,
    image: str = IMAGE,
    deadline_s: int = DEFAULT_DEADLINE_S,
    retries: int = DEFAULT_RETRIES,
    ttl_s: int = DEFAULT_TTL_S,
) -> Rendered:
    """A raw spec mapping (overrides applied) -> ConfigMap + NetworkPolicy + RayJob."""
    raw, spec = cluster_spec_of(raw, source)
    name = k8s_name(spec.name, source)
    groups = plan_groups(spec, source)
    configmap = f"{name}-spec"
    spec_text = f"# {source} as submitted by `alignlib k8s`\n" + yaml.safe_dump(raw, sort_keys=False)
    labels = _labels(name)
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
                "rayClusterSpec": cluster_spec(_pods(groups), image, configmap, object_store=is_uri(spec.output_dir)),
            },
        },
    ]
    return Rendered(name, spec, groups, documents)


def render_service(raw: dict[str, Any], source: str = "<spec>", *, image: str = IMAGE) -> Rendered:
    """A raw spec mapping (overrides applied) -> NetworkPolicy + RayService running `alignlib serve`'s
    application (alignlib.serving:app_builder) with the spec inline in serveConfigV2."""
    from alignlib.serving import preflight_spec

    raw, spec = cluster_spec_of(raw, source, preflight_spec)
    name = k8s_name(spec.name, source)
    groups = plan_groups(spec, source, serve_demands(spec))
    spec_yaml = f"# {source} as submitted by `alignlib k8s --serve`\n" + yaml.safe_dump(raw, sort_keys=False)
    serve_config = {
        "proxy_location": "HeadOnly",
        "http_options": {"host": "0.0.0.0", "port": SERVE_PORT},
        "applications": [
            {
                "name": "alignlib",
                "route_prefix": "/",
                "import_path": "alignlib.serving:app_builder",
                "args": {"spec_yaml": spec_yaml},
            }
        ],
    }
    cluster = cluster_spec(_pods(groups), image, serve_port=SERVE_PORT, object_store=is_uri(spec.output_dir))
    service = {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {"name": name, "labels": _labels(name)},
        "spec": {
            "serveConfigV2": yaml.dump(serve_config, Dumper=_BlockDumper, sort_keys=False, width=120),
            "rayClusterConfig": cluster,
        },
    }
    return Rendered(name, spec, groups, [network_policy(SERVE_PORT), service], kind="RayService")
