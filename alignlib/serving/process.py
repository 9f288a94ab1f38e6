"""The `alignlib serve` command: what is checked before anything starts, then Serve run until stopped, and
stopped cleanly."""

from __future__ import annotations

import time

from alignlib.serving.deployments import build_app, preflight_spec, reward_plan, serve_settings
from alignlib.serving.protocol import APP_NAME

# -- the command ---------------------------------------------------------------------------------------------


def preflight(spec) -> list[str]:
    """What would stop the server from starting here, found before Ray or any model starts."""
    import importlib.util

    from alignlib.sources import model_problem, models_read

    found = [
        p
        for field, model in [("policy.model", spec.policy.model), *models_read(spec, ["score"])]
        for p in [model_problem(field, model)]
        if p
    ]
    found += preflight_spec(spec)
    if importlib.util.find_spec("vllm") is None:
        found.append(
            "generate.engine: alignlib serve runs the policy on vLLM, which is not installed "
            "(pip install 'alignlib[cpu]' or 'alignlib[gpu]')"
        )
    return found


def serve_forever(spec, host: str, port: int) -> int:
    """Start the application on Ray Serve at host:port and serve until SIGTERM or Ctrl-C; then take it down.

    Taking it down is bounded: the application is deleted (and Serve shut down when nothing else is left)
    within STOP_TIMEOUT_S. When this command started Ray itself, every process that Ray ran for it (replicas,
    vLLM's engine core) and that still lives after Ray's shutdown is ended too: a SIGTERM sent to the whole
    process group (`timeout`, some supervisors) stops the raylet first, and its workers would be left behind.
    """
    import os
    import signal
    import threading

    import ray
    from ray import serve

    from alignlib.raydata import ensure_ray, log, verbose

    own_ray = not ray.is_initialized() and not os.environ.get("RAY_ADDRESS")
    ensure_ray()
    started = time.monotonic()
    # Serve's per-request and replica INFO lines stay off unless --verbose; warnings and errors still show.
    quiet = None if verbose() else {"log_level": "WARNING"}
    serve.start(http_options={"host": host, "port": port}, logging_config=quiet)
    serve.run(build_app(spec), name=APP_NAME, route_prefix="/", blocking=False, logging_config=quiet)
    settings = serve_settings(spec)
    log(
        f"serving {settings['model_name']} ({spec.policy.model}, best of n={settings['num_samples']} by "
        f"{', '.join(p.get('function') or p['model'] for p in reward_plan(spec))}) at http://{host}:{port}/v1 "
        f"after {time.monotonic() - started:.0f} s; stop with Ctrl-C or SIGTERM"
    )
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    ours: dict[int, float] = {}  # pid -> start time of the processes Ray runs for this command
    while not stop.wait(2.0):
        if own_ray:
            ours.update(_descendants())
    if own_ray:
        ours.update(_descendants())
    log("stopping the server")

    def take_down():
        serve.delete(APP_NAME)
        if not serve.status().applications:
            serve.shutdown()
        if own_ray:
            ray.shutdown()

    down = threading.Thread(target=take_down, daemon=True)
    down.start()
    down.join(STOP_TIMEOUT_S)
    if own_ray:
        _end(ours)
    if down.is_alive():
        log(f"Serve did not stop within {STOP_TIMEOUT_S} s (its Ray was stopped under it?); its processes were ended")
        os._exit(1)  # Ray's client threads would otherwise wait on a cluster that is gone
    return 0


STOP_TIMEOUT_S = 60


def _descendants() -> dict[int, float]:
    import psutil

    out = {}
    for child in psutil.Process().children(recursive=True):
        try:
            out[child.pid] = child.create_time()
        except psutil.Error:
            pass
    return out


def _end(processes: dict[int, float]) -> None:
    """SIGKILL the processes (pid -> start time) still alive; a pid reused by another process is left alone."""
    import psutil

    for pid, created in processes.items():
        try:
            process = psutil.Process(pid)
            if process.create_time() == created:
                process.kill()
        except psutil.Error:
            pass
