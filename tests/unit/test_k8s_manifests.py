"""Every Kubernetes object alignlib ships or renders is valid and secure by default.

- `kubectl kustomize` builds k8s/ and the overlay (skipped where kubectl is not installed);
- built-in kinds validate with kubernetes-validate against Kubernetes 1.32 (offline, strict: unknown
  fields are errors), RayCluster/RayJob against tests/schemas/kuberay-v1.json, and every pod they would
  create as a core/v1 PodTemplate;
- `alignlib k8s` output for each jobs/*.yaml validates the same way;
- the validators themselves reject the mistakes they are here to catch.
"""

from __future__ import annotations

import copy
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from k8s_check import security_problems, validation_errors

from alignlib.k8s import render
from alignlib.spec import load_raw

ROOT = Path(__file__).resolve().parents[2]
KUSTOMIZATIONS = ["k8s", "k8s/overlays/dpo-zero3-8b"]
JOBS = sorted(p.name for p in (ROOT / "jobs").glob("*.yaml"))
kubectl = shutil.which("kubectl")


def kustomize(rel: str) -> list[dict]:
    res = subprocess.run([kubectl, "kustomize", str(ROOT / rel)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, f"kubectl kustomize {rel} failed:\n{res.stderr}"
    return [d for d in yaml.safe_load_all(res.stdout) if d]


def source_manifests() -> list[dict]:
    docs = []
    for path in sorted((ROOT / "k8s" / "base").glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d and d.get("kind") != "Kustomization"]
    return docs


def rendered(job: str, *overrides: str) -> list[dict]:
    from alignlib.spec import apply_overrides

    return render(apply_overrides(load_raw(ROOT / "jobs" / job), list(overrides)), job).documents


@pytest.mark.skipif(kubectl is None, reason="kubectl not installed")
@pytest.mark.parametrize("rel", KUSTOMIZATIONS)
def test_kustomize_build_is_valid_kubernetes(rel):
    objs = kustomize(rel)
    assert sorted(o["kind"] for o in objs) == ["NetworkPolicy", "PersistentVolumeClaim", "RayCluster", "RayJob"]
    assert [e for o in objs for e in validation_errors(o)] == []
    assert security_problems(objs) == []
    for obj in objs:
        assert obj["metadata"]["labels"]["app.kubernetes.io/part-of"] == "alignlib", obj["kind"]


def test_source_manifests_are_valid_kubernetes():
    """The same checks on the files themselves, so a machine without kubectl still validates them."""
    objs = source_manifests()
    assert len(objs) == 4
    assert [e for o in objs for e in validation_errors(o)] == []
    assert security_problems(objs) == []


@pytest.mark.parametrize("job", JOBS)
def test_rendered_rayjob_is_valid_kubernetes(job):
    objs = rendered(job)
    assert [o["kind"] for o in objs] == ["ConfigMap", "NetworkPolicy", "RayJob"]
    assert [e for o in objs for e in validation_errors(o)] == []
    assert security_problems(objs) == []


# -------------------------------------------------- the validators can fail


def _rayjob() -> dict:
    return copy.deepcopy(rendered("orpo-qlora-7b.yaml")[2])


def _cluster(job: dict) -> dict:
    return job["spec"]["rayClusterSpec"]


def _worker(job: dict, group: int) -> dict:
    """The Ray container of a worker group's pod."""
    return _cluster(job)["workerGroupSpecs"][group]["template"]["spec"]["containers"][0]


def _submitter(job: dict) -> dict:
    return job["spec"]["submitterPodTemplate"]["spec"]["containers"][0]


@pytest.mark.parametrize(
    "mutate,expected",
    [
        (lambda j: _cluster(j)["workerGroupSpecs"][0].update(minReplica=0), "'minReplica' was unexpected"),
        (lambda j: _cluster(j)["headGroupSpec"]["rayStartParams"].update({"num-cpus": 0}), "0 is not of type 'string'"),
        (lambda j: j["spec"].update(clusterSelector={"ray.io/cluster": "alignlib"}), "is valid under each of"),
        (lambda j: j["spec"].update(shutdownAfterJobFinishes=False), "True was expected"),
        (lambda j: _cluster(j)["autoscalerOptions"].update(version="v3"), "'v3' is not one of"),
        (lambda j: _worker(j, 1).update(securityContext={"privilegd": False}), "'privilegd' was unexpected"),
        (lambda j: _submitter(j)["resources"]["limits"].update(cpu=[1]), "is not valid under any of the given schemas"),
        (lambda j: j["metadata"].update(name="alignlib-" + "x" * 40), "is too long"),
    ],
    ids=[
        "typo",
        "int-start-param",
        "selector-and-spec",
        "ttl-without-shutdown",
        "autoscaler-version",
        "pod-typo",
        "bad-quantity",
        "name-too-long",
    ],
)
def test_validation_rejects_mistakes(mutate, expected):
    job = _rayjob()
    mutate(job)
    errors = validation_errors(job)
    assert any(expected in e for e in errors), errors


def test_builtin_kinds_are_validated_strictly():
    policy = copy.deepcopy(rendered("demo.yaml")[1])
    policy["spec"]["ingres"] = policy["spec"].pop("ingress")
    assert validation_errors(policy) == [
        "NetworkPolicy/alignlib-ray spec: Additional properties are not allowed ('ingres' was unexpected)"
    ]
    assert validation_errors({"apiVersion": "v1", "kind": "Nonsense", "metadata": {"name": "x"}}) == [
        "Nonsense/x: not a Kubernetes 1.32.0 kind"
    ]


@pytest.mark.parametrize(
    "mutate,expected",
    [
        (lambda j: _cluster(j).pop("authOptions"), "token authentication is not on"),
        (lambda j: _cluster(j)["headGroupSpec"].update(serviceType="LoadBalancer"), "ClusterIP"),
        (lambda j: _worker(j, 0)["securityContext"].update(privileged=True), "privileged"),
        (lambda j: _submitter(j)["env"].append({"name": "HF_TOKEN", "value": "hf_abc"}), "HF_TOKEN is a literal"),
        (lambda j: _cluster(j)["workerGroupSpecs"][0]["template"]["metadata"].pop("labels"), "lacks the label"),
    ],
    ids=["no-auth", "exposed-head", "privileged", "literal-secret", "unlabelled-pod"],
)
def test_security_check_catches_regressions(mutate, expected):
    objs = copy.deepcopy(rendered("orpo-qlora-7b.yaml"))
    mutate(objs[2])
    assert any(expected in p for p in security_problems(objs)), security_problems(objs)


SERVED = [
    "score.reward={type: model, model: 'builtin:tiny-reward', resources: {CPU: 1}}",
    "generate.resources={GPU: 1}",
    "serve.engine.replicas=[0, 4]",
]


def test_rendered_rayservice_is_valid_kubernetes_and_its_serve_config_is_valid_for_ray_serve():
    from ray.serve.schema import ServeDeploySchema

    from alignlib.k8s import render_service
    from alignlib.spec import apply_overrides

    objs = render_service(apply_overrides(load_raw(ROOT / "jobs" / "demo.yaml"), SERVED), "demo.yaml").documents
    assert [o["kind"] for o in objs] == ["NetworkPolicy", "RayService"]
    assert [e for o in objs for e in validation_errors(o)] == []
    assert security_problems(objs) == []
    config = ServeDeploySchema.model_validate(yaml.safe_load(objs[1]["spec"]["serveConfigV2"]))
    assert [a.import_path for a in config.applications] == ["alignlib.serving:app_builder"]
    assert config.http_options.port == 8000
