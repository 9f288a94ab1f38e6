"""`alignlib k8s JOB.yaml`: the RayJob it renders is sized from the spec and runs that exact spec.

What a user would check before `kubectl apply`: which worker groups and how many pods at most, that the
entrypoint runs the spec from the ConfigMap with their overrides applied, where outputs go, that no
secret ends up in the YAML, that the pods match the kustomize base, and clear errors for bad input.
"""

from __future__ import annotations

import copy
import shlex
from pathlib import Path

import pytest
import yaml

from alignlib.cli import main
from alignlib.k8s import PART_OF, render, render_file
from alignlib.spec import SpecError, apply_overrides, load_raw, load_spec

ROOT = Path(__file__).resolve().parents[2]
JOBS = ROOT / "jobs"


def job(name: str, *overrides: str):
    return render(apply_overrides(load_raw(JOBS / name), list(overrides)), f"jobs/{name}")


def groups(name: str, *overrides: str) -> dict[str, int]:
    return {g.shape.group: g.max_replicas for g in job(name, *overrides).groups}


def rayjob(rendered) -> dict:
    return rendered.documents[2]


def worker_groups(rendered) -> dict[str, dict]:
    return {g["groupName"]: g for g in rayjob(rendered)["spec"]["rayClusterSpec"]["workerGroupSpecs"]}


# ---------------------------------------------------------------- sizing


def test_qlora_job_uses_single_gpu_pods():
    # generate, score and QLoRA training each ask for 1-GPU actors; concurrency [1, 4] -> at most 4 pods
    assert groups("orpo-qlora-7b.yaml") == {"cpu": 1, "gpu-1": 4}


def test_zero3_on_eight_gpus_gets_an_eight_gpu_pod():
    # generate/score: 8 x {GPU: 1} on 1-GPU pods; training: 8 DeepSpeed workers on one 8-GPU pod
    assert groups("dpo-zero3-8b.yaml") == {"cpu": 1, "gpu-1": 8, "gpu-8": 1}
    pod = worker_groups(job("dpo-zero3-8b.yaml"))["gpu-8"]["template"]["spec"]["containers"][0]
    assert pod["resources"]["limits"]["nvidia.com/gpu"] == 8


def test_cpu_only_job_gets_cpu_workers_only():
    assert groups("demo.yaml") == {"cpu": 1}
    # 16 engine actors of 2 CPUs on 8-CPU pods -> 4 pods
    assert groups("demo.yaml", "generate.concurrency=[2, 16]", "generate.resources={CPU: 2}") == {"cpu": 4}


def test_stages_run_one_after_another_so_the_peak_counts_not_the_sum():
    # 4 generate actors, then 2 training workers: 4 one-GPU pods, not 6
    peak = groups("orpo-qlora-7b.yaml", "score.reward.concurrency=2", "train.backend={name: ddp, num_workers: 2}")
    assert peak["gpu-1"] == 4
    # 6 DDP workers on 1 GPU each stay on 1-GPU pods; 8 move to an 8-GPU pod
    assert groups("orpo-qlora-7b.yaml", "train.backend={name: ddp, num_workers: 6}") == {"cpu": 1, "gpu-1": 6}
    assert groups("orpo-qlora-7b.yaml", "train.backend={name: ddp, num_workers: 16}")["gpu-8"] == 2


def test_tensor_parallel_engines_go_to_eight_gpu_pods():
    # 4 engines x tensor_parallel_size 2 = 8 GPUs -> one 8-GPU pod (an engine cannot span pods)
    g = groups("dpo-zero3-8b.yaml", "generate.concurrency=4", "generate.engine_kwargs.tensor_parallel_size=2")
    assert g["gpu-8"] == 1 and g["gpu-1"] == 8  # gpu-1 still sized by the 8 reward actors


def test_an_actor_larger_than_any_pod_is_refused():
    with pytest.raises(SpecError) as err:
        job("dpo-zero3-8b.yaml", "generate.engine_kwargs.tensor_parallel_size=16")
    assert err.value.problems == [
        "generate.resources: one generate actor asks for {GPU: 16}, more than the largest pod (8 GPU, 64 CPU); "
        "lower it or split the model (tensor_parallel_size <= 8)"
    ]


def test_custom_resources_and_oversized_cpu_actors_are_refused():
    with pytest.raises(SpecError) as err:
        job(
            "demo.yaml",
            "generate.resources={CPU: 1, engine: 1}",
            "train.backend.num_workers=1",
            "score.reward={type: model, model: builtin:tiny-reward, resources: {CPU: 12}}",
        )
    assert err.value.problems == [
        "generate.resources: no worker group offers the custom resource(s) ['engine']; on Kubernetes ask for "
        "CPU/GPU only",
        "score.reward.resources: one score actor asks for {CPU: 12}, more than the largest pod (0 GPU, 8 CPU); "
        "lower it",
    ]


def test_every_group_starts_at_zero_and_the_head_runs_no_tasks():
    r = job("dpo-zero3-8b.yaml")
    cluster = rayjob(r)["spec"]["rayClusterSpec"]
    assert cluster["enableInTreeAutoscaling"] is True and cluster["autoscalerOptions"]["version"] == "v2"
    # The 8B DPO job generates and scores on 1-GPU pods, trains on an 8-GPU pod and exports on a CPU pod.
    assert sorted(g["groupName"] for g in cluster["workerGroupSpecs"]) == ["cpu", "gpu-1", "gpu-8"]
    for g in cluster["workerGroupSpecs"]:
        assert (g["replicas"], g["minReplicas"]) == (0, 0), g["groupName"]
        assert g["idleTimeoutSeconds"] > 0
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head["resources"]["limits"]


def reasons(rendered) -> list[str]:
    return [r for g in rendered.groups for r in g.reasons]


def test_the_default_reward_renders_with_a_cpu_step():
    # No score.reward at all: the default function reward (exact_match), a light CPU step, no GPU pod.
    raw = apply_overrides(load_raw(JOBS / "demo.yaml"), [])
    del raw["score"]
    r = render(raw, "jobs/demo.yaml")
    assert {g.shape.group: g.max_replicas for g in r.groups} == {"cpu": 1}
    assert "score: 1 x {CPU: 0.5}" in reasons(r)


def test_every_model_reward_in_a_weighted_sum_sizes_the_gpu_group():
    rewards = (
        "score.rewards=[{type: model, model: a/rm, resources: {GPU: 1}, concurrency: [1, 3]}, "
        "{type: model, model: b/rm, resources: {GPU: 2}, concurrency: 4, name: big}, "
        "{type: function, function: 'alignlib.rewards:length_penalty', weight: 0.1}]"
    )
    r = job("orpo-qlora-7b.yaml", "score.reward=null", rewards)
    assert "score: 3 x {CPU: 1, GPU: 1}" in reasons(r) and "score: 1 x {CPU: 0.5}" in reasons(r)
    # the second reward model needs 2 GPUs per actor: 4 of them go to one 8-GPU pod
    assert "score: 4 x {CPU: 1, GPU: 2}" in reasons(r)
    assert {g.shape.group: g.max_replicas for g in r.groups}["gpu-8"] == 1
    too_big = "score.rewards=[{type: model, model: a/rm, resources: {GPU: 9}}]"
    with pytest.raises(SpecError) as err:
        job("orpo-qlora-7b.yaml", "score.reward=null", too_big)
    assert err.value.problems[0].startswith("score.rewards[0].resources: one score actor asks for {CPU: 1, GPU: 9}")


def test_reference_logps_actors_are_sized_like_the_training_workers():
    r = job("dpo-zero3-8b.yaml")
    assert "ref_logps: 8 x {GPU: 1}" in reasons(r) and "train: 8 x {CPU: 1, GPU: 1}" in reasons(r)
    without_reference = job("dpo-zero3-8b.yaml", "train.precompute_reference=false")
    assert not any(x.startswith("ref_logps") for x in reasons(without_reference))


def test_a_preference_file_job_sizes_eval_engines_but_no_generate_stage():
    r = job("orpo-qlora-7b.yaml", "data.kind=preferences", "generate.weak_model=null", "pairs={}")
    assert not any(x.startswith(("generate", "score:")) for x in reasons(r))
    assert any(x.startswith("eval:") for x in reasons(r)), "eval samples the base and trained policy on GPUs"


# ------------------------------------------------------- the job it runs


def test_entrypoint_runs_the_spec_from_the_configmap_with_overrides(tmp_path):
    r = job("orpo-qlora-7b.yaml", "train.epochs=3", "generate.num_samples=6")
    configmap, _, rj = r.documents
    spec = rj["spec"]
    assert shlex.split(spec["entrypoint"]) == ["python", "-m", "alignlib", "run", "/etc/alignlib/job.yaml"]
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    mount = [m for m in head["containers"][0]["volumeMounts"] if m["mountPath"] == "/etc/alignlib"]
    volume = [v for v in head["volumes"] if v["name"] == mount[0]["name"]]
    assert mount[0]["readOnly"] is True and volume[0]["configMap"]["name"] == configmap["metadata"]["name"]
    # the ConfigMap's job.yaml is the user's spec with the overrides, and validates to the same job
    (tmp_path / "job.yaml").write_text(configmap["data"]["job.yaml"])
    from_cluster = load_spec(tmp_path / "job.yaml")
    assert from_cluster == load_spec(JOBS / "orpo-qlora-7b.yaml", ["train.epochs=3", "generate.num_samples=6"])
    assert from_cluster.train.epochs == 3


def test_relative_output_dir_lands_on_the_shared_volume():
    r = job("demo.yaml")
    assert r.spec.output_dir == "/mnt/shared/runs/demo"
    assert "output_dir: /mnt/shared/runs/demo" in r.documents[0]["data"]["job.yaml"]


def test_an_object_store_output_dir_needs_no_shared_volume_and_takes_credentials_by_reference_only(monkeypatch):
    from k8s_check import security_problems, validation_errors

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws_do_not_leak_this")
    r = job("dpo-zero3-8b.yaml", "output_dir=s3://team-bucket/runs/dpo", "data.path=jobs/data/addition.jsonl")
    assert r.spec.output_dir == "s3://team-bucket/runs/dpo"
    assert "output_dir: s3://team-bucket/runs/dpo" in r.documents[0]["data"]["job.yaml"]
    text = r.to_yaml()
    assert "persistentVolumeClaim" not in text and "/mnt/shared" not in text and "do_not_leak" not in text
    assert "Secret alignlib-storage" in text.split("apiVersion")[0], "the header says which Secret to create"
    cluster = rayjob(r)["spec"]["rayClusterSpec"]
    pods = [cluster["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]
    for pod in pods:
        container = pod["containers"][0]
        assert container["envFrom"] == [{"secretRef": {"name": "alignlib-storage", "optional": False}}]
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["ALIGNLIB_CACHE"] == "/cache/alignlib" and env["HF_HOME"] == "/cache/hf"
        assert not any(k.startswith("AWS_") for k in env), "credentials only through the Secret"
        assert {"name": "cache", "emptyDir": {}} in pod["volumes"]
    assert [e for o in r.documents for e in validation_errors(o)] == []
    assert security_problems(r.documents) == []


def test_an_object_store_job_with_its_data_on_the_shared_volume_is_refused():
    with pytest.raises(SpecError) as err:
        job("demo.yaml", "output_dir=s3://team-bucket/runs/demo", "data.path=/mnt/shared/data/prompts.jsonl")
    assert "data.path: /mnt/shared/data/prompts.jsonl is not in the image (/app)" in str(err.value)


def test_deadline_retries_and_deletion():
    spec = rayjob(render_file(str(JOBS / "demo.yaml"), [], deadline_s=3600, retries=1))["spec"]
    assert spec["activeDeadlineSeconds"] == 3600
    assert spec["backoffLimit"] == 1 and spec["submitterConfig"]["backoffLimit"] == 1
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0


def test_no_secret_reaches_the_yaml(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_do_not_leak_this")
    monkeypatch.setenv("RAY_AUTH_TOKEN", "ray_do_not_leak_this")
    text = job("orpo-qlora-7b.yaml").to_yaml()
    assert "do_not_leak" not in text
    docs = list(yaml.safe_load_all(text))
    submitter = docs[2]["spec"]["submitterPodTemplate"]["spec"]["containers"][0]
    token = {e["name"]: e for e in submitter["env"]}["RAY_AUTH_TOKEN"]
    assert token["valueFrom"]["secretKeyRef"] == {"name": "alignlib-ray-auth", "key": "auth_token"}


def without(mapping: dict, *keys: str) -> dict:
    return {k: v for k, v in mapping.items() if k not in keys}


def test_rendered_pods_are_the_base_pods_with_only_the_jobs_settings():
    """A job's cluster is k8s/base/raycluster.yaml's, but for maxReplicas and the spec's ConfigMap on the head."""
    base = yaml.safe_load((ROOT / "k8s" / "base" / "raycluster.yaml").read_text())["spec"]
    cluster = copy.deepcopy(rayjob(job("dpo-zero3-8b.yaml"))["spec"]["rayClusterSpec"])
    base_groups = {g["groupName"]: g for g in base["workerGroupSpecs"]}
    assert [g["groupName"] for g in cluster["workerGroupSpecs"]] == list(base_groups) == ["cpu", "gpu-1", "gpu-8"]
    for g in cluster["workerGroupSpecs"]:
        assert without(g, "maxReplicas") == without(base_groups[g["groupName"]], "maxReplicas"), g["groupName"]
    head = cluster["headGroupSpec"]
    pod = head["template"]["spec"]
    assert pod["volumes"].pop() == {"name": "job-spec", "configMap": {"name": "alignlib-dpo-zero3-8b-spec"}}
    assert pod["containers"][0]["volumeMounts"].pop()["name"] == "job-spec"
    assert head == base["headGroupSpec"]
    assert without(cluster, "headGroupSpec", "workerGroupSpecs") == without(base, "headGroupSpec", "workerGroupSpecs")
    base_job = yaml.safe_load((ROOT / "k8s" / "base" / "rayjob.yaml").read_text())["spec"]
    assert rayjob(job("demo.yaml"))["spec"]["submitterPodTemplate"] == base_job["submitterPodTemplate"]
    base_policy = yaml.safe_load((ROOT / "k8s" / "base" / "networkpolicy.yaml").read_text())
    assert job("demo.yaml").documents[1] == {**base_policy, "metadata": {**base_policy["metadata"], "labels": PART_OF}}


def test_k8s_base_holds_copies_of_the_package_manifests():
    """One source: alignlib/k8s/manifests/ (shipped in the package, rendered by `alignlib k8s`); kustomize's copies
    in k8s/base must not drift from it."""
    from alignlib.k8s.base import COMMAND, MANIFESTS, stale

    kustomization = yaml.safe_load((ROOT / "k8s" / "base" / "kustomization.yaml").read_text())
    assert set(MANIFESTS) <= set(kustomization["resources"])
    drifted = stale(ROOT / "k8s" / "base")
    assert drifted == [], (
        f"k8s/base/{drifted} differ from alignlib/k8s/manifests/: edit the manifests there, then run `{COMMAND}`"
    )


def test_the_base_command_writes_the_copies_and_its_check_catches_an_edited_one(tmp_path, capsys):
    from alignlib.k8s.base import main
    from alignlib.k8s.pods import manifest_text

    assert main([str(tmp_path)]) == 0
    for name in ("networkpolicy.yaml", "raycluster.yaml", "rayjob.yaml"):
        first, second, rest = (tmp_path / name).read_text().split("\n", 2)
        assert first == f"# Generated from alignlib/k8s/manifests/{name} by `python -m alignlib.k8s.base`:"
        assert second == "# edit that file, not this one." and rest == manifest_text(name)
    assert main(["--check", str(tmp_path)]) == 0
    capsys.readouterr()
    edited = (tmp_path / "raycluster.yaml").read_text().replace("maxReplicas: 4", "maxReplicas: 5")
    (tmp_path / "raycluster.yaml").write_text(edited)
    assert main(["--check", str(tmp_path)]) == 1
    assert capsys.readouterr().err == (
        f"{tmp_path / 'raycluster.yaml'} differs from alignlib/k8s/manifests/raycluster.yaml; "
        "run `python -m alignlib.k8s.base`\n"
    )
    assert (tmp_path / "raycluster.yaml").read_text() == edited, "--check writes nothing"
    assert main([str(tmp_path)]) == 0
    assert f"wrote {tmp_path / 'raycluster.yaml'}" in capsys.readouterr().err
    assert main(["--check", str(tmp_path)]) == 0
    assert main([str(tmp_path / "nope")]) == 2


# -------------------------------------------------------------- the CLI


def test_cli_writes_the_file(tmp_path, capsys):
    out = tmp_path / "demo-rayjob.yaml"
    assert main(["k8s", str(JOBS / "demo.yaml"), "train.epochs=1", "-o", str(out), "--image", "reg/alignlib:1"]) == 0
    assert f"wrote RayJob alignlib-demo (cpu x1) to {out}" in capsys.readouterr().err
    docs = list(yaml.safe_load_all(out.read_text()))
    assert [d["kind"] for d in docs] == ["ConfigMap", "NetworkPolicy", "RayJob"]
    assert "train:\n  loss:" in docs[0]["data"]["job.yaml"] and "epochs: 1\n" in docs[0]["data"]["job.yaml"]
    images = [line.split("image: ")[1] for line in out.read_text().splitlines() if "image: " in line]
    assert len(images) == 3 and set(images) == {"reg/alignlib:1"}  # head, cpu workers, submitter


def test_cli_prints_to_stdout(capsys):
    assert main(["k8s", str(JOBS / "orpo-qlora-7b.yaml")]) == 0
    text = capsys.readouterr().out
    assert text.startswith("# alignlib k8s: job 'orpo-qlora-7b' -> RayJob alignlib-orpo-qlora-7b")
    assert "#   gpu-1 x4: generate: 4 x {GPU: 1}" in text


@pytest.mark.parametrize(
    "args,expected",
    [
        (["output_dir=/tmp/elsewhere"], "output_dir: /tmp/elsewhere is not on the shared volume every pod mounts"),
        (["data.path=/home/me/prompts.jsonl"], "data.path: /home/me/prompts.jsonl is not in the image (/app)"),
        (["train.backend.num_workers=0"], "train.backend.num_workers: Input should be greater than or equal to 1"),
        (["name=" + "n" * 60], "longer than 47 characters; use a shorter job name"),
    ],
)
def test_cli_bad_input_exits_2_naming_the_field(args, expected, capsys):
    assert main(["k8s", str(JOBS / "demo.yaml"), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"{JOBS / 'demo.yaml'}: ") and expected in err


def test_cli_missing_spec_file(tmp_path, capsys):
    assert main(["k8s", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml: 1 problem(s) in the job spec:\n  - file not found" in capsys.readouterr().err


@pytest.mark.parametrize("option", [["--retries", "-1"], ["--deadline", "0"]])
def test_cli_refuses_nonsense_options(option, capsys):
    assert main(["k8s", str(JOBS / "demo.yaml"), *option]) == 2
    assert "alignlib k8s: --deadline must be >= 1 and --retries >= 0" in capsys.readouterr().err


# -------------------------------------------------------------- --serve: a RayService


SERVED = [
    "score.reward={type: model, model: 'builtin:tiny-reward', resources: {CPU: 1}}",
    "generate.resources={GPU: 1}",
    "serve.engine.replicas=[0, 4]",
    "serve.num_samples=8",
]


def test_serve_renders_a_rayservice_sized_from_the_replicas_that_serves_the_same_spec(tmp_path, capsys):
    from ray.serve import Application

    from alignlib.serving import app_builder, serve_settings

    out = tmp_path / "serve.yaml"
    assert main(["k8s", str(JOBS / "demo.yaml"), "--serve", *SERVED, "-o", str(out)]) == 0
    assert f"wrote RayService alignlib-demo (cpu x1, gpu-1 x4) to {out}" in capsys.readouterr().err
    text = out.read_text()
    assert "#   gpu-1 x4: serve: 4 x {GPU: 1}" in text
    network, service = yaml.safe_load_all(text)
    cluster = service["spec"]["rayClusterConfig"]
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    assert (groups["gpu-1"]["minReplicas"], groups["gpu-1"]["maxReplicas"]) == (0, 4), "GPU pods scale from 0"
    head_ports = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]
    assert {"containerPort": 8000, "name": "serve"} in head_ports
    assert {
        "from": [{"podSelector": {"matchLabels": {"alignlib/client": "true"}}}],
        "ports": [{"protocol": "TCP", "port": 8000}],
    } in network["spec"]["ingress"]
    app = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"][0]
    assert app["import_path"] == "alignlib.serving:app_builder"
    # The application is built from the spec carried inline: the same settings as `alignlib serve` with the overrides.
    served = load_spec(JOBS / "demo.yaml", SERVED)
    assert serve_settings(served)["num_samples"] == 8
    assert isinstance(app_builder(app["args"]), Application)
    rebuilt = yaml.safe_load(app["args"]["spec_yaml"])
    assert rebuilt["serve"] == {"engine": {"replicas": [0, 4]}, "num_samples": 8}
    assert rebuilt["output_dir"] == "/mnt/shared/runs/demo"


def test_serve_refuses_a_gold_answer_reward_when_rendering(capsys):
    assert main(["k8s", str(JOBS / "demo.yaml"), "--serve"]) == 2
    err = capsys.readouterr().err
    assert "score.reward: alignlib.rewards:numeric_closeness compares answers with the data's gold answer" in err
