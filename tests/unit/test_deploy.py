"""Checks on alignlib's deployment files (k8s/, cluster/).

They need only pyyaml and the repo: no cluster, no kubectl, no Ray. Each test
pins something a user of the manifests would notice: GPU workers that scale
from zero, a head without a GPU, a shared volume everywhere, a RayJob that runs
a job spec that exists, one image name, and a working cluster/local.sh.
"""

from __future__ import annotations

import copy
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
CLUSTER = ROOT / "cluster"
LOCAL_SH = CLUSTER / "local.sh"
OVERLAY = K8S / "overlays" / "dpo-zero3-8b"
SHARED = "/mnt/shared"
GPU = "nvidia.com/gpu"

REQUIRED_FILES = [
    "k8s/kustomization.yaml",
    "k8s/base/kustomization.yaml",
    "k8s/base/pvc.yaml",
    "k8s/base/networkpolicy.yaml",
    "k8s/base/raycluster.yaml",
    "k8s/base/rayjob.yaml",
    "k8s/overlays/dpo-zero3-8b/kustomization.yaml",
    "cluster/aws-gpu.yaml",
    "cluster/Dockerfile",
    "cluster/local.sh",
]


# ----------------------------------------------------------------- helpers


def yaml_files() -> list[Path]:
    return sorted(p for d in (K8S, CLUSTER) for p in d.rglob("*") if p.is_file() and p.suffix in (".yaml", ".yml"))


def load_docs(path: Path) -> list:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def base_manifests() -> list[dict]:
    """The Kubernetes objects of the base, in kustomization order."""
    kust = load_docs(K8S / "base" / "kustomization.yaml")[0]
    out = []
    for res in kust["resources"]:
        out += load_docs(K8S / "base" / res)
    return out


def only(objs: list[dict], kind: str) -> dict:
    found = [o for o in objs if o.get("kind") == kind]
    assert len(found) == 1, f"expected exactly one {kind}, found {len(found)}"
    return found[0]


def group(raycluster: dict, name: str) -> dict:
    groups = [g for g in raycluster["spec"]["workerGroupSpecs"] if g["groupName"] == name]
    assert len(groups) == 1, f"RayCluster needs exactly one worker group named {name}"
    return groups[0]


def gpu_group(raycluster: dict) -> dict:
    return group(raycluster, "gpu-1")


def containers(group: dict) -> list[dict]:
    found = group["template"]["spec"].get("containers") or []
    assert found, f"{group.get('groupName', 'head')}: the pod template has no container"
    return found


def _resolve(doc, path: str):
    parts = [p.replace("~1", "/").replace("~0", "~") for p in path.lstrip("/").split("/")]
    node = doc
    for p in parts[:-1]:
        node = node[int(p)] if isinstance(node, list) else node[p]
    return node, parts[-1]


def apply_overlay(objs: list[dict], kust: dict) -> list[dict]:
    """Apply the JSON6902 patches of an overlay kustomization, as kustomize does.

    Enough of RFC 6902 for our overlays (test/replace/add); a patch whose
    target matches nothing or whose path is missing fails here, where
    kustomize would fail or silently do nothing.
    """
    objs = copy.deepcopy(objs)
    for patch in kust.get("patches", []):
        target = patch["target"]
        hits = [
            o
            for o in objs
            if o["kind"] == target["kind"] and o["metadata"]["name"] == target.get("name", o["metadata"]["name"])
        ]
        assert hits, f"overlay patch targets nothing: {target}"
        for obj in hits:
            for op in yaml.safe_load(patch["patch"]):
                parent, key = _resolve(obj, op["path"])
                idx = int(key) if isinstance(parent, list) else key
                if op["op"] == "test":
                    assert parent[idx] == op["value"], f"overlay test failed at {op['path']}"
                elif op["op"] == "replace":
                    parent[idx]  # must exist, as RFC 6902 requires
                    parent[idx] = op["value"]
                elif op["op"] == "add":
                    parent[idx] = op["value"]
                else:
                    raise AssertionError(f"unsupported op {op['op']} in overlay")
    return objs


def overlay_manifests() -> list[dict]:
    kust = load_docs(OVERLAY / "kustomization.yaml")[0]
    assert "../../base" in kust["resources"], "the dpo-zero3-8b overlay must build on k8s/base"
    return apply_overlay(base_manifests(), kust)


def walk_images(node):
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "image" and isinstance(v, str):
                yield v
            else:
                yield from walk_images(v)
    elif isinstance(node, list):
        for v in node:
            yield from walk_images(v)


def image_name(ref: str) -> str:
    """registry/alignlib:tag@sha256:... -> registry/alignlib"""
    ref = ref.split("@", 1)[0]
    last = ref.rsplit("/", 1)[-1]
    return ref[: len(ref) - len(last)] + last.split(":", 1)[0]


# ----------------------------------------------------------- files & YAML


@pytest.mark.parametrize("rel", REQUIRED_FILES)
def test_deploy_file_exists(rel):
    assert (ROOT / rel).is_file(), f"{rel} is missing"


def test_every_deploy_yaml_parses():
    files = yaml_files()
    assert len(files) >= 6, f"expected the k8s/ and cluster/ YAML files, found {files}"
    for path in files:
        docs = load_docs(path)
        assert docs, f"{path.relative_to(ROOT)} is empty"
        for doc in docs:
            assert isinstance(doc, dict), f"{path.relative_to(ROOT)}: top level must be a mapping"
            if path.is_relative_to(K8S):
                assert {"apiVersion", "kind"} <= doc.keys(), f"{path.relative_to(ROOT)} lacks apiVersion/kind"
                if doc["kind"] != "Kustomization":
                    assert doc.get("metadata", {}).get("name"), f"{path.relative_to(ROOT)} lacks metadata.name"


@pytest.mark.parametrize("variant", ["base", "dpo-zero3-8b"])
def test_kuberay_objects_use_ray_io_v1(variant):
    objs = base_manifests() if variant == "base" else overlay_manifests()
    for kind in ("RayCluster", "RayJob"):
        assert only(objs, kind)["apiVersion"] == "ray.io/v1", f"{kind} must use ray.io/v1"


# -------------------------------------------------------------- RayCluster


@pytest.mark.parametrize("name,gpus", [("cpu", 0), ("gpu-1", 1), ("gpu-8", 8)])
def test_worker_groups_scale_from_zero_with_their_gpus(name, gpus):
    g = group(only(base_manifests(), "RayCluster"), name)
    assert g["minReplicas"] == 0, "idle nodes must be released: minReplicas 0"
    assert g.get("replicas", 0) == 0, "no worker pod should start before a job asks for one"
    assert g["maxReplicas"] >= 1, "maxReplicas 0 means the group can never start"
    assert g["idleTimeoutSeconds"] > 0
    for c in containers(g):
        limits = c["resources"]["limits"]
        requests = c["resources"].get("requests", limits)
        assert int(limits.get(GPU, 0)) == gpus, f"{name}/{c['name']} must have {gpus} x {GPU}"
        assert int(requests.get(GPU, 0)) == gpus, f"{name}/{c['name']}: GPU requests must equal limits"


def test_autoscaling_is_enabled():
    spec = only(base_manifests(), "RayCluster")["spec"]
    assert spec.get("enableInTreeAutoscaling") is True, "without the autoscaler GPU workers stay at 0"
    opts = spec["autoscalerOptions"]
    assert opts["version"] == "v2", "per-group idle timeouts need autoscaler v2"
    assert opts["upscalingMode"] in ("Default", "Aggressive", "Conservative")
    assert opts["idleTimeoutSeconds"] > 0


def test_every_worker_has_a_memory_backed_dev_shm():
    spec = only(base_manifests(), "RayCluster")["spec"]
    assert spec["workerGroupSpecs"], "the RayCluster has no worker group"
    for g in spec["workerGroupSpecs"]:
        pod = g["template"]["spec"]
        shm = [v for v in pod["volumes"] if v.get("emptyDir", {}).get("medium") == "Memory"]
        assert len(shm) == 1 and shm[0]["emptyDir"]["sizeLimit"], f"{g['groupName']}: /dev/shm must be a sized tmpfs"
        for c in containers(g):
            assert {"name": shm[0]["name"], "mountPath": "/dev/shm"} in c["volumeMounts"], g["groupName"]


def test_head_has_no_gpu():
    head = only(base_manifests(), "RayCluster")["spec"]["headGroupSpec"]
    for c in containers(head):
        for part in ("limits", "requests"):
            assert GPU not in c.get("resources", {}).get(part, {}), f"head container {c['name']} asks for a GPU"
    assert str(head.get("rayStartParams", {}).get("num-gpus", "0")) == "0"


def test_shared_volume_on_head_and_every_worker():
    objs = base_manifests()
    pvc = only(objs, "PersistentVolumeClaim")
    assert "ReadWriteMany" in pvc["spec"]["accessModes"], "output_dir is written from many nodes: RWX needed"
    spec = only(objs, "RayCluster")["spec"]
    groups = [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec["workerGroupSpecs"]]
    for name, group in groups:
        pod = group["template"]["spec"]
        claims = {
            v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v
        }
        for c in containers(group):
            mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
            assert SHARED in mounts, f"{name}/{c['name']} does not mount {SHARED}"
            assert claims.get(mounts[SHARED]) == pvc["metadata"]["name"], f"{name}: {SHARED} is not the shared PVC"
            env = {e["name"]: e.get("value") for e in c.get("env", [])}
            assert (env.get("HF_HOME") or "").startswith(SHARED + "/"), f"{name}: HF_HOME must be on {SHARED}"


def test_ray_version_matches_image_and_constraints():
    ray_version = str(only(base_manifests(), "RayCluster")["spec"]["rayVersion"])
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    m = re.search(r"^FROM\s+rayproject/ray:(\S+?)-py3\d+-gpu\s*$", dockerfile, re.M)
    assert m, "cluster/Dockerfile must build FROM rayproject/ray:<version>-py3XX-gpu"
    assert m.group(1) == ray_version, "Dockerfile base image and RayCluster rayVersion disagree"
    c = re.search(r"-c\s+(\S+)", dockerfile)
    assert c and (ROOT / c.group(1)).is_file(), "the Dockerfile's pip constraints file is missing"
    pins = (ROOT / c.group(1)).read_text()
    assert f"ray=={ray_version}" in pins, "constraints must keep the image's ray version"
    for package in ("torch", "vllm", "deepspeed", "bitsandbytes"):
        assert re.search(rf"^{package}==", pins, re.M), f"constraints must pin {package} (the image is built with them)"


# ------------------------------------------------------------------ RayJob


def test_rayjob_runs_on_the_raycluster():
    objs = base_manifests()
    job = only(objs, "RayJob")["spec"]
    cluster_name = only(objs, "RayCluster")["metadata"]["name"]
    assert job["clusterSelector"] == {"ray.io/cluster": cluster_name}, "RayJob selects a cluster that is not defined"
    assert "rayClusterSpec" not in job
    assert job["submissionMode"] == "K8sJobMode"
    # KubeRay never deletes a selected cluster, and rejects a TTL > 0 then.
    assert job["shutdownAfterJobFinishes"] is False
    assert job["ttlSecondsAfterFinished"] == 0


def test_rayjob_working_dir_is_the_image_workdir():
    job = only(base_manifests(), "RayJob")["spec"]
    workdir = re.findall(r"^WORKDIR\s+(\S+)", (CLUSTER / "Dockerfile").read_text(), re.M)
    assert workdir, "cluster/Dockerfile sets no WORKDIR"
    assert yaml.safe_load(job["runtimeEnvYAML"])["working_dir"] == workdir[-1]


@pytest.mark.parametrize("variant", ["base", "dpo-zero3-8b"])
def test_rayjob_entrypoint_names_an_existing_job_spec(variant):
    objs = base_manifests() if variant == "base" else overlay_manifests()
    argv = shlex.split(only(objs, "RayJob")["spec"]["entrypoint"])
    assert argv[:4] == ["python", "-m", "alignlib", "run"], (
        f"entrypoint should be 'python -m alignlib run ...', got {argv}"
    )
    argv = argv[2:]
    spec = argv[2]
    assert re.fullmatch(r"jobs/[\w.-]+\.ya?ml", spec), f"entrypoint should name jobs/*.yaml, got {spec}"
    assert (ROOT / spec).is_file(), f"RayJob ({variant}) runs {spec}, which is not in the repo"
    outs = [a.split("=", 1)[1] for a in argv[3:] if a.startswith("output_dir=")]
    assert len(outs) == 1 and outs[0].startswith(SHARED + "/"), "output_dir must be on the shared volume"


def test_overlay_runs_dpo_on_eight_gpus():
    base, over = base_manifests(), overlay_manifests()
    job = only(over, "RayJob")
    assert "jobs/dpo-zero3-8b.yaml" in job["spec"]["entrypoint"]
    assert job["metadata"]["name"] != only(base, "RayJob")["metadata"]["name"], "overlay would replace the base job"
    assert gpu_group(only(over, "RayCluster"))["maxReplicas"] == 8
    assert gpu_group(only(over, "RayCluster"))["minReplicas"] == 0
    assert group(only(over, "RayCluster"), "gpu-8")["maxReplicas"] == 1, "ZeRO-3 on 8 GPUs needs one 8-GPU pod"


# ------------------------------------------------------------- kustomize


def test_images_resolve_to_one_name():
    refs = [ref for o in base_manifests() for ref in walk_images(o)]
    assert len(refs) >= 2, "expected head and worker images"
    names = {image_name(r) for r in refs}
    assert len(names) == 1, f"k8s/ uses several images: {sorted(names)}"
    (name,) = names
    for kust_path in K8S.rglob("kustomization.yaml"):
        for entry in load_docs(kust_path)[0].get("images", []):
            assert entry["name"] == name, f"{kust_path.relative_to(ROOT)} retags {entry['name']}, not {name}"
    base_images = load_docs(K8S / "base" / "kustomization.yaml")[0].get("images", [])
    assert [e["name"] for e in base_images] == [name], "base kustomization needs one images: entry for retagging"


def test_kustomization_resources_exist():
    kusts = sorted(K8S.rglob("kustomization.yaml"))
    assert len(kusts) >= 3
    for kust_path in kusts:
        kust = load_docs(kust_path)[0]
        assert kust.get("resources"), f"{kust_path.relative_to(ROOT)} lists no resources"
        for res in kust["resources"]:
            target = (kust_path.parent / res).resolve()
            assert target.exists(), f"{kust_path.relative_to(ROOT)}: resource {res} does not exist"
            if target.is_dir():
                assert (target / "kustomization.yaml").is_file(), f"{res} is a directory without kustomization.yaml"
                # kustomize rejects a base directory that contains the overlay using it
                here = kust_path.parent.resolve()
                assert target != here and target not in here.parents, f"{res} contains {kust_path.parent}"
        for patch in kust.get("patches", []):
            if "path" in patch:
                assert (kust_path.parent / patch["path"]).is_file(), f"patch file {patch['path']} missing"


# ------------------------------------------------------ cluster launcher


def test_aws_cluster_has_cpu_head_and_autoscaling_gpu_workers():
    cfg = load_docs(CLUSTER / "aws-gpu.yaml")[0]
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["resources"].get("CPU") == 0, "the head runs no tasks"
    workers = {name: t for name, t in types.items() if name != cfg["head_node_type"]}
    assert all(t.get("min_workers", 0) == 0 and t["max_workers"] >= 1 for t in workers.values()), "scale from 0"
    # the same shapes as the KubeRay worker groups: CPU, 1 GPU, 8 GPUs
    assert sorted(t["resources"].get("GPU", 0) for t in workers.values()) == [0, 1, 8]
    assert image_name(cfg["docker"]["image"]).endswith("/alignlib")
    assert any(SHARED in opt for opt in cfg["docker"]["run_options"]), f"containers must see {SHARED}"


# ---------------------------------------------------------------- local.sh

bash = shutil.which("bash")
needs_bash = pytest.mark.skipif(bash is None, reason="bash not installed")


def run_local(*args, script=LOCAL_SH, env=None):
    return subprocess.run([bash, str(script), *args], capture_output=True, text=True, timeout=60, env=env)


@needs_bash
def test_local_sh_is_valid_bash():
    res = subprocess.run([bash, "-n", str(LOCAL_SH)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


@needs_bash
@pytest.mark.parametrize("args", [(), ("frobnicate",), ("submit",)])
def test_local_sh_prints_usage_on_bad_arguments(args):
    res = run_local(*args)
    assert res.returncode == 2, (res.returncode, res.stderr)
    assert "usage:" in res.stderr
    assert "submit JOB.yaml" in res.stderr


@needs_bash
def test_local_sh_rejects_a_missing_job_spec():
    res = run_local("submit", "jobs/does-not-exist.yaml")
    assert res.returncode != 0
    assert "does-not-exist.yaml" in res.stderr


@pytest.fixture
def fake_repo(tmp_path):
    """A copy of local.sh in a scratch repo, with a `ray` that prints its argv."""
    (tmp_path / "cluster").mkdir()
    shutil.copy(LOCAL_SH, tmp_path / "cluster" / "local.sh")
    (tmp_path / "jobs").mkdir()
    (tmp_path / "jobs" / "demo.yaml").write_text("name: demo\n")
    fake = tmp_path / "bin" / "ray"
    fake.parent.mkdir()
    fake.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@"\n')
    fake.chmod(0o755)
    env = {"PATH": "/usr/bin:/bin", "RAY": str(fake)}
    return tmp_path, tmp_path / "cluster" / "local.sh", env


@needs_bash
def test_local_sh_submit_ships_repo_and_runs_alignlib(fake_repo):
    repo, script, env = fake_repo
    res = run_local("submit", "jobs/demo.yaml", "seed=3", script=script, env=env)
    assert res.returncode == 0, res.stderr
    argv = res.stdout.splitlines()
    assert argv[:3] == ["job", "submit", "--address"] and argv[3] == "http://127.0.0.1:8265"
    assert argv[argv.index("--working-dir") + 1] == str(repo)
    excludes = argv[argv.index("--runtime-env-json") + 1]
    assert ".venv" in excludes and "runs/" in excludes
    entry = argv[argv.index("--") + 1 :]
    assert entry[:6] == ["python", "-m", "alignlib", "run", "jobs/demo.yaml", "seed=3"]
    # a relative output_dir would vanish into Ray's copy of the repo
    assert entry[6:] == [f"output_dir={repo}/runs/demo"]


@needs_bash
def test_local_sh_submit_keeps_users_output_dir(fake_repo):
    _, script, env = fake_repo
    res = run_local("submit", "jobs/demo.yaml", "output_dir=/mnt/shared/runs/x", script=script, env=env)
    assert res.returncode == 0, res.stderr
    outs = [a for a in res.stdout.splitlines() if a.startswith("output_dir=")]
    assert outs == ["output_dir=/mnt/shared/runs/x"]


@needs_bash
def test_local_sh_start_binds_dashboard_to_loopback(fake_repo):
    _, script, env = fake_repo
    res = run_local("start", script=script, env=env)
    assert res.returncode == 0, res.stderr
    argv = res.stdout.splitlines()
    assert argv[:2] == ["start", "--head"]
    assert argv[argv.index("--dashboard-host") + 1] == "127.0.0.1"
    assert argv[argv.index("--dashboard-port") + 1] == "8265"
    assert "http://127.0.0.1:8265" in res.stdout
