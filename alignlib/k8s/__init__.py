"""`alignlib k8s JOB.yaml`: the Kubernetes objects that run one job spec on KubeRay.

In: a job spec (and `key=value` overrides). Out: YAML documents for `kubectl apply -f`:
- a ConfigMap holding the validated spec, mounted on the Ray head at /etc/alignlib/job.yaml;
- a NetworkPolicy letting only alignlib pods (and the KubeRay operator, on the dashboard port) reach Ray;
- a RayJob whose entrypoint is `python -m alignlib run /etc/alignlib/job.yaml`, with its own
  autoscaling RayCluster: a CPU-only head and worker groups sized from what the stages ask for.

    alignlib k8s jobs/dpo-zero3-8b.yaml -o dpo.yaml && kubectl apply -f dpo.yaml

With --serve, a NetworkPolicy and a RayService running `alignlib serve`'s application instead.

- manifests/*.yaml: the pods, the submitter and the NetworkPolicy, defined once; k8s/base holds copies
  (`python -m alignlib.k8s.base` writes them, base.py);
- pods.py: reads the manifests; a job's cluster from them, and the pod shapes;
- sizing.py: which worker groups a job needs, and how many pods each;
- rendering.py: the objects of a RayJob or a RayService and their YAML;
- here: the command line.
"""

from __future__ import annotations

from typing import Any

from alignlib.k8s.pods import (
    APP_DIR,
    CACHE,
    CPU,
    GPU_1,
    GPU_8,
    IMAGE,
    PART_OF,
    PVC,
    RAY_AUTH_SECRET,
    RAY_VERSION,
    SHAPES,
    SHARED,
    SPEC_DIR,
    SPEC_FILE,
    STORAGE_SECRET,
    PodShape,
    cluster_spec,
    head_group,
    network_policy,
    submitter_pod,
    worker_group,
)
from alignlib.k8s.rendering import (
    DEFAULT_DEADLINE_S,
    DEFAULT_RETRIES,
    DEFAULT_TTL_S,
    MAX_NAME,
    SERVE_PORT,
    Rendered,
    cluster_paths,
    cluster_spec_of,
    k8s_name,
    render,
    render_service,
)
from alignlib.k8s.sizing import WorkerGroup, plan_groups, serve_demands
from alignlib.spec import SpecError, apply_overrides

__all__ = [
    "APP_DIR",
    "CACHE",
    "CPU",
    "DEFAULT_DEADLINE_S",
    "DEFAULT_RETRIES",
    "DEFAULT_TTL_S",
    "GPU_1",
    "GPU_8",
    "IMAGE",
    "MAX_NAME",
    "PART_OF",
    "PVC",
    "RAY_AUTH_SECRET",
    "RAY_VERSION",
    "SERVE_PORT",
    "SHAPES",
    "SHARED",
    "SPEC_DIR",
    "SPEC_FILE",
    "STORAGE_SECRET",
    "PodShape",
    "Rendered",
    "WorkerGroup",
    "add_arguments",
    "cluster_paths",
    "cluster_spec",
    "cluster_spec_of",
    "command",
    "head_group",
    "k8s_name",
    "network_policy",
    "plan_groups",
    "render",
    "render_file",
    "render_service",
    "serve_demands",
    "submitter_pod",
    "worker_group",
]


def render_file(path: str, overrides: list[str], **options: Any) -> Rendered:
    from pathlib import Path

    from alignlib.spec import load_raw

    raw = load_raw(Path(path))
    if not isinstance(raw, dict):
        raise SpecError(str(path), ["the job spec must be a YAML mapping"])
    if options.pop("serve", False):
        return render_service(apply_overrides(raw, overrides), str(path), image=options.get("image", IMAGE))
    return render(apply_overrides(raw, overrides), str(path), **options)


def add_arguments(cmd) -> None:
    """Options of `alignlib k8s` (the subcommand itself is registered in cli.py)."""
    cmd.add_argument("-o", "--output", metavar="FILE", help="write the YAML here instead of stdout")
    cmd.add_argument("--image", default=IMAGE, help=f"container image of every pod (default {IMAGE})")
    cmd.add_argument(
        "--deadline",
        type=int,
        default=DEFAULT_DEADLINE_S,
        metavar="SECONDS",
        help=f"activeDeadlineSeconds of the RayJob (default {DEFAULT_DEADLINE_S})",
    )
    cmd.add_argument(
        "--serve",
        action="store_true",
        help=f"render a RayService serving best-of-N answers (`alignlib serve`) on port {SERVE_PORT} "
        "instead of the RayJob",
    )
    cmd.add_argument(
        "--retries",
        type=int,
        default=DEFAULT_RETRIES,
        help=f"retries, each on a fresh cluster, resuming from complete stages (default {DEFAULT_RETRIES})",
    )


def command(args) -> int:
    import sys
    from pathlib import Path

    if args.deadline < 1 or args.retries < 0:
        print("alignlib k8s: --deadline must be >= 1 and --retries >= 0", file=sys.stderr)
        return 2
    try:
        rendered = render_file(
            args.spec,
            args.overrides,
            image=args.image,
            deadline_s=args.deadline,
            retries=args.retries,
            serve=args.serve,
        )
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
