"""One local Ray instance for the whole test session (starting Ray costs seconds, not milliseconds), and one
real S3 server (SeaweedFS) for the runs that write to an object store.

Built-in models are built into a per-session cache so tests never depend on ~/.cache; the
variable is set before Ray starts so Ray's worker processes see the same cache. The S3 endpoint and
credentials go into the environment when this file is imported, before any Ray starts, for the same reason.
"""

import os
import sys
import uuid
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from s3_server import BUCKET, S3Server  # noqa: E402

S3 = S3Server()
os.environ.update(S3.environment())


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("alignlib-cache")
    os.environ["ALIGNLIB_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def ray_session(model_cache):
    import ray

    from alignlib.raydata import init_ray

    init_ray(num_cpus=2, include_dashboard=False, log_to_driver=True)  # as alignlib starts its own local Ray
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """The running S3 server (started on first use): `S3Server`, with `filesystem()` for checks."""
    S3.start(tmp_path_factory.mktemp("seaweedfs"))
    yield S3
    S3.stop()


@pytest.fixture
def s3_prefix(s3_server) -> str:
    """A fresh `s3://bucket/prefix` of its own for one test."""
    return f"s3://{BUCKET}/{uuid.uuid4().hex[:12]}"
