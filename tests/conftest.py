"""One local Ray instance for the whole test session (starting Ray costs seconds, not milliseconds).

Built-in models are built into a per-session cache so tests never depend on ~/.cache; the
variable is set before Ray starts so Ray's worker processes see the same cache.
"""

import os

import pytest


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("alignlib-cache")
    os.environ["ALIGNLIB_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def ray_session(model_cache):
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=True)
    yield ray
    ray.shutdown()
