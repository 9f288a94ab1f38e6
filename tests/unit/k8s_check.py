"""Validation of Kubernetes objects for the tests: built-in kinds with kubernetes-validate, KubeRay kinds with
the hand-written schema in tests/schemas/kuberay-v1.json plus every embedded pod template as a core/v1
PodTemplate, and the security rules alignlib's manifests promise.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import kubernetes_validate

# kubernetes-validate ships the OpenAPI schemas of each Kubernetes release; pin the one we check against
# (the oldest release the manifests are meant for) so an upgrade of the package cannot move it silently.
K8S_VERSION = "1.32.0"
KUBERAY_SCHEMA = json.loads((Path(__file__).resolve().parents[1] / "schemas" / "kuberay-v1.json").read_text())
PART_OF = {"app.kubernetes.io/part-of": "alignlib"}
SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSWORD|ACCESS_KEY|CREDENTIAL", re.I)


def _kuberay_validator(kind: str) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator({**KUBERAY_SCHEMA, "$ref": f"#/$defs/{kind}"})


def pod_templates(obj: dict) -> list[tuple[str, dict]]:
    """(where, template) of every pod a RayCluster, RayJob or RayService would create."""
    spec = obj.get("spec", {})
    out = []
    if obj["kind"] == "RayJob":
        if "submitterPodTemplate" in spec:
            out.append(("spec.submitterPodTemplate", spec["submitterPodTemplate"]))
        cluster, prefix = spec.get("rayClusterSpec"), "spec.rayClusterSpec"
    elif obj["kind"] == "RayService":
        cluster, prefix = spec.get("rayClusterConfig"), "spec.rayClusterConfig"
    else:
        cluster, prefix = spec, "spec"
    if cluster:
        out.append((f"{prefix}.headGroupSpec.template", cluster["headGroupSpec"]["template"]))
        for i, g in enumerate(cluster.get("workerGroupSpecs", [])):
            out.append((f"{prefix}.workerGroupSpecs[{i}].template", g["template"]))
    return out


def validation_errors(obj: dict) -> list[str]:
    """Every schema problem of one object, as "Kind/name path: message"."""
    name = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
    errors = []
    if obj.get("kind") in ("RayCluster", "RayJob", "RayService"):
        for err in _kuberay_validator(obj["kind"]).iter_errors(obj):
            errors.append(f"{name} {'.'.join(map(str, err.absolute_path))}: {err.message}")
        for where, template in pod_templates(obj):
            wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "check"}, "template": template}
            try:
                kubernetes_validate.validate(wrapped, K8S_VERSION, strict=True)
            except kubernetes_validate.ValidationError as err:
                path = ".".join(map(str, list(err.path)[1:]))
                errors.append(f"{name} {where}.{path}: {err.message}")
    else:
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as err:
            errors.append(f"{name} {'.'.join(map(str, err.path))}: {err.message}")
        except kubernetes_validate.SchemaNotFoundError:
            errors.append(f"{name}: not a Kubernetes {K8S_VERSION} kind")
    return errors


def security_problems(objs: list[dict]) -> list[str]:
    """Pods non-root and unprivileged, secrets only by reference, Ray token auth on, head not exposed."""
    problems = []
    policies = [o for o in objs if o["kind"] == "NetworkPolicy"]
    for obj in objs:
        if obj["kind"] not in ("RayCluster", "RayJob", "RayService"):
            continue
        name = f"{obj['kind']}/{obj['metadata']['name']}"
        spec = obj["spec"]
        cluster = {"RayJob": spec.get("rayClusterSpec"), "RayService": spec.get("rayClusterConfig")}.get(
            obj["kind"], spec
        )
        if cluster:
            if cluster.get("authOptions", {}).get("mode") != "token":
                problems.append(f"{name}: Ray token authentication is not on (authOptions.mode: token)")
            if cluster["headGroupSpec"].get("serviceType", "ClusterIP") != "ClusterIP":
                problems.append(f"{name}: the head service (dashboard, job API) must stay ClusterIP")
        for where, template in pod_templates(obj):
            pod = template["spec"]
            labels = template.get("metadata", {}).get("labels", {})
            if not PART_OF.items() <= labels.items():
                problems.append(f"{name} {where}: pod lacks the label the NetworkPolicy selects")
            if not any(PART_OF.items() <= p["spec"]["podSelector"].get("matchLabels", {}).items() for p in policies):
                problems.append(f"{name} {where}: no NetworkPolicy selects this pod")
            if pod.get("securityContext", {}).get("runAsNonRoot") is not True:
                problems.append(f"{name} {where}: pod must set securityContext.runAsNonRoot")
            for key in ("hostNetwork", "hostPID", "hostIPC"):
                if pod.get(key):
                    problems.append(f"{name} {where}: {key} is on")
            if any("hostPath" in v for v in pod.get("volumes", [])):
                problems.append(f"{name} {where}: hostPath volume")
            for c in pod["containers"]:
                sc = c.get("securityContext", {})
                if sc.get("privileged", False) or sc.get("allowPrivilegeEscalation", True):
                    problems.append(f"{name} {where} {c['name']}: privileged or may escalate privileges")
                if "ALL" not in sc.get("capabilities", {}).get("drop", []):
                    problems.append(f"{name} {where} {c['name']}: capabilities not dropped")
                for env in c.get("env", []):
                    if SECRET_NAME.search(env["name"]) and "value" in env:
                        problems.append(f"{name} {where} {c['name']}: {env['name']} is a literal, not a secretKeyRef")
    return problems
