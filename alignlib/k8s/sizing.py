"""Which worker groups a job needs and how many pods each may grow to.

Stages run one after another, so a group's maxReplicas is the largest number of pods any one stage needs, never
the sum. Every group starts at 0 pods; the Ray autoscaler adds pods while actors, placement groups or Train
workers wait for resources, and removes them when idle. The pod shapes are raycluster.yaml's worker groups.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from alignlib.k8s.pods import CPU, GPU_1, GPU_8, SHAPES, PodShape
from alignlib.spec import JobSpec, SpecError
from alignlib.stages import demands


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
            problems.setdefault(
                d.field,
                f"{d.field}: no worker group offers the custom resource(s) {custom}; on Kubernetes ask for CPU/GPU only",
            )
            continue
        # Workers that start together (training: ZeRO-3 or any) on 8+ GPUs go to 8-GPU pods: NVLink inside a node,
        # not the network.
        if gpus > 1 or (d.gang and gpus and d.count * gpus >= GPU_8.gpu):
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


def serve_demands(spec: JobSpec) -> list:
    """What `alignlib serve` asks Ray for at most: the engine and reward replicas (their upper bounds)."""
    from alignlib.serving import GATEWAY_CPUS, engine_resources, reward_resources
    from alignlib.spec import most
    from alignlib.stages import Demand

    serve = spec.serve
    return [
        Demand("serve", "serve.engine.resources", most(serve.engine.replicas), dict(engine_resources(spec))),
        Demand("serve", "serve.reward.resources", most(serve.reward.replicas), dict(reward_resources(spec))),
        Demand("serve", "serve (gateway)", 1, {"CPU": GATEWAY_CPUS}),
    ]
