"""Run alignlib's generate stage on a fake autoscaling Ray cluster; print what the nodes did as JSON.

Ray's fake multi-node provider (the mechanism behind `ray.cluster_utils.AutoscalingCluster`) starts real
raylets on this machine as "nodes". The head has no CPUs, like the KubeRay head (`num-cpus: 0`), and a
worker type `engine` has 2 CPUs and one `engine` resource, 0 to 2 nodes. The job asks for 2 engine actors
of {CPU: 1, engine: 1}: nothing fits at the start, so the stage only runs if the autoscaler adds two
nodes, which it must remove again once they are idle.

AutoscalingCluster itself is not used because its start() and shutdown() run `ray stop --force` (every Ray
process of the user, other test sessions included) and the config template it reads is not in the wheel.

    python tests/integration/autoscaling_scenario.py OUTPUT_DIR RAY_TEMP_DIR    # last stdout line: JSON
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

from local_ray import LocalHead

ROOT = Path(__file__).resolve().parents[2]
IDLE_TIMEOUT_MIN = 0.25  # 15 s: idle nodes go quickly in a test, but not between two datasets of a stage
MAX_ENGINE_NODES = 2


def autoscaling_config(gcs_address: str) -> dict:
    return {
        "cluster_name": "alignlib-fake",
        "max_workers": MAX_ENGINE_NODES,
        "provider": {
            "type": "fake_multinode",
            "gcs_address": gcs_address,
            "use_node_id_as_ip": True,  # how the fake provider matches Ray nodes to its own
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
        },
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            "engine": {
                "resources": {"CPU": 2, "engine": 1, "object_store_memory": 200 * 1024**2},
                "node_config": {},
                "min_workers": 0,
                "max_workers": MAX_ENGINE_NODES,
            },
        },
        "head_node_type": "ray.head.default",
        "auth": {},
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": IDLE_TIMEOUT_MIN,
        "docker": {},
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
    }


class NodeWatch(threading.Thread):
    """Samples the alive worker nodes (and their `engine` resources) every half second."""

    def __init__(self):
        super().__init__(daemon=True)
        self.samples: list[tuple[float, int]] = []
        self.engine_total = 0.0
        self.done = threading.Event()

    def alive_workers(self) -> list[dict]:
        import ray

        return [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0]

    def run(self):
        while not self.done.is_set():
            workers = self.alive_workers()
            self.samples.append((time.time(), len(workers)))
            self.engine_total = max(self.engine_total, sum(n["Resources"].get("engine", 0) for n in workers))
            time.sleep(0.5)


def main(output_dir: str, temp_dir: str) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        config_path = f.name
    head = LocalHead(
        num_cpus=0,
        autoscaling_config=config_path,
        env={"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"},
        temp_dir=temp_dir,
    )
    Path(config_path).write_text(json.dumps(autoscaling_config(head.gcs_address)))
    # Before Ray is imported: it reads the auth mode once.
    os.environ.update(head.auth_env, RAY_ADDRESS=head.gcs_address)
    import ray

    result: dict = {}
    try:
        head.start()
        ray.init(address=head.gcs_address, log_to_driver=False)
        watch = NodeWatch()
        result["workers_before"] = len(watch.alive_workers())
        watch.start()

        from alignlib.pipeline import Pipeline
        from alignlib.spec import load_spec

        spec = load_spec(
            ROOT / "jobs" / "demo.yaml",
            [
                # small on purpose: the point is where the actors run, not how much they generate
                f"output_dir={output_dir}",
                "rounds.count=1",
                "data.limit=12",
                "data.gold_field=null",
                "generate.engine=transformers",
                "generate.num_samples=2",
                "generate.weak_model=null",
                "pairs.strategy=best_vs_worst",
                "generate.batch_size=4",
                "generate.concurrency=2",
                "generate.resources={CPU: 1, engine: 1}",
            ],
        )
        started = time.time()
        manifests = Pipeline(spec).run(["prompts", "generate"])
        finished = time.time()
        result["generate_s"] = round(finished - started, 1)
        result["train_prompts"] = manifests["prompts"]["tables"]["train"]
        result["completions"] = manifests["generate"]["tables"]["completions"]
        # Idle nodes must go: wait for the worker count to come back to 0.
        deadline = finished + 120
        while watch.alive_workers() and time.time() < deadline:
            time.sleep(1)
        watch.done.set()
        watch.join()
        result["max_workers"] = max(n for _, n in watch.samples)
        result["first_worker_after_s"] = round(min(t for t, n in watch.samples if n) - started, 1)
        result["engine_total"] = watch.engine_total
        result["workers_after"] = len(watch.alive_workers())
        result["released_after_s"] = round(time.time() - finished, 1)
        ray.shutdown()
    finally:
        head.stop()
        os.unlink(config_path)
    return result


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2])), flush=True)
