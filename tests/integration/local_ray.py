"""A Ray head of its own on 127.0.0.1 for tests that need a real cluster (`ray job submit`, autoscaling).

Every port is a free one picked here and the head gets its own short temp dir, so it never collides with
another Ray on the machine (the session-wide `ray.init()` of tests/conftest.py, or someone else's).
`ray stop` would stop every Ray process of this user, so `stop()` ends only this head's processes: those
whose command line names its temp dir or its GCS address, by pid.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from alignlib.raydata import RAY_DEFAULTS

HOST = "127.0.0.1"


def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((HOST, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def ray_executable() -> str:
    return str(Path(sys.executable).with_name("ray"))


class LocalHead:
    def __init__(
        self,
        num_cpus: int,
        dashboard: bool = False,
        autoscaling_config: str | None = None,
        env: dict[str, str] | None = None,
        temp_dir: str | None = None,
    ):
        ports = free_ports(10)
        self.port, self.dashboard_port, self.client_port = ports[0], ports[1], ports[2]
        self.gcs_address = f"{HOST}:{self.port}"
        self.dashboard_url = f"http://{HOST}:{self.dashboard_port}"
        # Unix socket paths under the temp dir are limited to ~107 bytes: keep it short.
        self.temp_dir = temp_dir or tempfile.mkdtemp(prefix="alr-", dir="/tmp")
        # Token auth on, with a token of this head's own: clients need RAY_AUTH_MODE/RAY_AUTH_TOKEN from
        # `auth_env` (Ray 2.60 also turns auth on by itself when ~/.ray/auth_token exists).
        self.auth_env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
        self.env = {**RAY_DEFAULTS, **os.environ, **self.auth_env, **(env or {})}
        self.args = [
            ray_executable(),
            "start",
            "--head",
            "--node-ip-address",
            HOST,
            "--port",
            str(self.port),
            "--num-cpus",
            str(num_cpus),
            "--temp-dir",
            self.temp_dir,
            "--disable-usage-stats",
            "--ray-client-server-port",
            str(self.client_port),
            "--dashboard-agent-listen-port",
            str(ports[3]),
            "--dashboard-agent-grpc-port",
            str(ports[4]),
            "--metrics-export-port",
            str(ports[5]),
            "--runtime-env-agent-port",
            str(ports[6]),
            "--node-manager-port",
            str(ports[7]),
            "--object-manager-port",
            str(ports[8]),
            "--object-store-memory",
            str(300 * 1024**2),
        ]
        if dashboard:
            self.args += [
                "--include-dashboard",
                "true",
                "--dashboard-host",
                HOST,
                "--dashboard-port",
                str(self.dashboard_port),
            ]
        else:
            self.args += ["--include-dashboard", "false"]
        if autoscaling_config:
            self.args += ["--autoscaling-config", autoscaling_config]

    def start(self, attempts: int = 3) -> LocalHead:
        # Ray gives a raylet 30 s to register with GCS; on a loaded 2-core machine that can run out.
        for attempt in range(1, attempts + 1):
            res = subprocess.run(self.args, env=self.env, capture_output=True, text=True, timeout=180)
            if res.returncode == 0:
                return self
            stop_processes(self.markers)
            if attempt == attempts or "timed out during startup" not in res.stderr + res.stdout:
                shutil.rmtree(self.temp_dir, ignore_errors=True)
                raise RuntimeError(f"ray start failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
        return self

    @property
    def markers(self) -> list[str]:
        """What the command line of each of this head's processes holds. The Ray client server names the GCS
        by the machine's address, not HOST: it is found by its own port."""
        return [self.temp_dir, self.gcs_address, f"--gcs_server_port={self.port}", f"--port={self.client_port}"]

    def stop(self) -> None:
        stop_processes(self.markers)
        if not os.environ.get("ALIGNLIB_KEEP_RAY_LOGS"):
            shutil.rmtree(self.temp_dir, ignore_errors=True)

    def wait_for_dashboard(self, timeout: float = 60) -> None:
        import urllib.error
        import urllib.request

        deadline = time.time() + timeout
        while True:
            try:
                urllib.request.urlopen(f"{self.dashboard_url}/api/version", timeout=5)
                return
            except urllib.error.HTTPError:
                return  # it answers (401 without a token is an answer)
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(1)


def stop_processes(markers: list[str], timeout: float = 20) -> int:
    """Terminate (then kill) this user's processes whose command line contains one of `markers`; by pid."""
    me, found = os.getpid(), []
    for p in psutil.process_iter(["pid", "cmdline", "uids"]):
        try:
            cmdline = " ".join(p.info["cmdline"] or [])
            if p.pid != me and p.info["uids"].real == os.getuid() and any(m in cmdline for m in markers):
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, TypeError):
            continue
    for p in found:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(found, timeout=timeout)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)
    return len(found)
