"""Ray and Ray Data helpers every stage shares: starting Ray, actor pools, batching, ordered execution.

Kept apart from the stages so that generate, score, training and eval depend on this module and not on
each other. Ray itself is imported inside the functions: importing alignlib never starts or loads Ray.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from alignlib.redaction import redact

# CPU share of the row-reshaping steps around an engine. They are cheap, and asking for a whole
# core each can leave an engine actor's pipeline unschedulable on a small machine.
LIGHT_CPUS = 0.25

# A killed engine or reward actor (OOM kill, lost node, preemption): Ray Data's actor pools restart it
# and retry the batches that were in flight on it (their defaults, max_restarts and max_task_retries
# -1, without a limit; Ray 2.60 deprecates setting them through map_batches). A batch that kills its
# actor every time (a prompt that crashes the engine) would be retried for ever, so alignlib's own actors
# and tasks count each batch's starts (`counted_batch`): one whose process died under it MAX_BATCH_DEATHS
# times is not tried again and the stage fails, naming it. Whatever the retries did, a stage then checks that no row
# was lost or written twice before it commits (`alignlib.verify`), and tests/integration/test_faults.py
# kills those actors for real.
MAX_BATCH_DEATHS = 3


class BatchKilledError(RuntimeError):
    """A batch whose process died under it MAX_BATCH_DEATHS times: the stage stops instead of retrying it."""


class _BatchStarts:
    """A Ray actor of the driver's job: how many times each unfinished batch was started."""

    def __init__(self) -> None:
        self.starts: dict[str, int] = {}

    def start(self, key: str) -> int:
        self.starts[key] = self.starts.get(key, 0) + 1
        return self.starts[key]

    def done(self, key: str) -> None:
        self.starts.pop(key, None)


_batch_starts = None  # the driver's handle: the counter lives as long as the driver


def _batch_starts_name() -> str:
    import ray

    return f"alignlib-batch-starts-{ray.get_runtime_context().get_job_id()}"


def count_batch_starts() -> None:
    """In the driver, before an engine or reward actor pool runs: start this job's batch counter (once)."""
    global _batch_starts
    import ray

    if _batch_starts is None or _batch_starts[0] != _batch_starts_name():
        actor = ray.remote(num_cpus=0)(_BatchStarts).options(name=_batch_starts_name(), get_if_exists=True)
        _batch_starts = (_batch_starts_name(), actor.remote())


_counters: dict = {}  # in an actor or task's process: the counter's handle, looked up once per job


def _counter():
    import ray

    name = _batch_starts_name()
    if name not in _counters:
        try:
            _counters[name] = ray.get_actor(name)
        except ValueError:
            return None  # an actor class used outside a stage (tests, notebooks): no counting
    return _counters[name]


@contextmanager
def counted_batch(batch, what: str) -> Iterator[None]:
    """Around an engine or reward actor's (or a function reward's task's) work on `batch` (a pyarrow table):
    count this start, and refuse the batch (BatchKilledError) if its process already died under it
    MAX_BATCH_DEATHS times. A batch that finishes starts from zero if it comes again."""
    import hashlib

    import ray

    from alignlib import schema as S

    counter = _counter()
    if counter is None:
        yield
        return
    keys = [c for c in (S.PROMPT_ID, S.GENERATOR, S.SAMPLE_INDEX, S.SEED, S.COMPLETION) if c in batch.column_names]
    key = f"{what}:" + hashlib.blake2b(repr(batch.select(keys).to_pydict()).encode(), digest_size=16).hexdigest()
    starts = ray.get(counter.start.remote(key))
    if starts > MAX_BATCH_DEATHS:
        where = ""
        if S.SOURCE in batch.column_names and batch.num_rows:
            sources = batch[S.SOURCE].to_pylist()
            where = f" (prompts {sources[0]} to {sources[-1]})"
        raise BatchKilledError(
            f"{what}: a batch of {batch.num_rows} rows{where} was started {starts - 1} times and the process running "
            f"it died each time (killed, out of memory, or a crash in native code such as the engine's: the Ray "
            f"worker logs have its last lines); not tried again"
        )
    yield
    counter.done.remote(key)


def log(message: str) -> None:
    """One progress line on stdout; values of secret-looking environment variables are masked."""
    print(redact(f"[alignlib] {message}"), flush=True)


# Settings for the Ray processes alignlib starts (a local Ray; cluster/local.sh and cluster/Dockerfile set the
# same), unless the environment already sets them. Ray Train's controller checks its workers every 2 s by
# default, so a finished run waited up to 2 s more before `fit()` returned; at 0.5 s, end of the last step
# to `fit()` returned went from 5.0 s to 1.8 s (tiny model, 2 cores).
RAY_DEFAULTS = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}


def set_ray_defaults() -> None:
    """`RAY_DEFAULTS` into this process's environment (inherited by a Ray it starts), where not set."""
    import os

    for name, value in RAY_DEFAULTS.items():
        os.environ.setdefault(name, value)


_own_ray = False  # this process started the (one-machine) Ray it uses: no autoscaler, no other nodes


def init_ray(**kwargs) -> None:
    """`ray.init(**kwargs)`, tried up to three times: a local start on a busy machine can miss Ray's fixed
    30 s window for the raylet to register, with nothing else wrong."""
    import os

    import ray

    global _own_ray
    set_ray_defaults()
    for attempt in range(1, 4):
        try:
            ray.init(**kwargs)
            # ray.init() attaches to RAY_ADDRESS's cluster when it is set; otherwise this process started Ray.
            _own_ray = not (kwargs.get("address") or os.environ.get("RAY_ADDRESS"))
            return
        except Exception as err:
            if "timed out during startup" not in str(err) or attempt == 3:
                raise
            log(f"Ray's local start timed out (busy machine?); trying again ({attempt + 1}/3)")
            ray.shutdown()


def verbose() -> bool:
    """ALIGNLIB_VERBOSE=1 (`alignlib run --verbose`): Ray's and vLLM's own logs and progress bars too."""
    import os

    return os.environ.get("ALIGNLIB_VERBOSE", "") not in ("", "0")


def ensure_ray() -> None:
    """Attach to the cluster named by RAY_ADDRESS (`ray job submit` sets it) or start a local one.

    Quiet unless `verbose()`: Ray's INFO logging and Ray Data's block-count bars stay off (alignlib prints
    rows done, rate and time left itself); warnings and errors, and lines our workers print, still show.
    """
    import logging
    import os

    import ray
    import ray.data  # configures its loggers on import: set their levels after it

    quiet = not verbose()
    if not ray.is_initialized():
        # Workers' Python logging too (Ray Data's, Ray Train's, ray.llm's INFO lines in actors).
        options = {"logging_level": logging.WARNING, "logging_config": ray.LoggingConfig(log_level="WARNING")}
        init_ray(log_to_driver=True, **(options if quiet else {}))
    if quiet:
        for name in ("ray", "ray.data", "ray.train", "ray.tune", "ray.llm"):
            logging.getLogger(name).setLevel(logging.WARNING)
        ray.data.DataContext.get_current().enable_progress_bars = False
    # Let a stage's own error (a reward that failed on file:line) reach the user, not Ray Data's
    # generic "UDF failed to process a data block" wrapper.
    ray.data.DataContext.get_current().raise_original_map_exception = True
    if _own_ray and "RAY_DATA_USE_DATASOURCE_V2" not in os.environ:
        # Ray Data 2.60's new Parquet reader starts up to 32 `FooterReader` actors for each read_parquet to read
        # file footers: worth it for thousands of files, a process start each for alignlib's stage tables (one
        # to a few hundred files). The established reader: 0.25 s against 1.1-1.9 s to read and count a 360-row
        # table with warm workers, 2 cores. Only on a Ray this process started: on an autoscaling cluster a node
        # was not released after a stage that read with it (tests/integration/test_autoscaling.py, 3 runs of 3;
        # the new reader passed). RAY_DATA_USE_DATASOURCE_V2=1 or 0 decides either way.
        ray.data.DataContext.get_current().use_datasource_v2 = False


@contextmanager
def ordered_data(enabled: bool = True) -> Iterator[None]:
    """Ray Data datasets made and run inside keep every step's output in input order (if `enabled`).

    A model's output for a row differs in the last bits with the rows batched beside it (padding,
    matrix shapes), and a sampled token or a reward can follow. Unordered, blocks reach an actor in
    the order tasks happen to finish, so batches differ between runs; ordered, a rerun (or a retry
    after a killed actor) batches the same rows together and gives the same bytes.
    """
    import ray

    options = ray.data.DataContext.get_current().execution_options
    before, options.preserve_order = options.preserve_order, enabled or options.preserve_order
    try:
        yield
    finally:
        options.preserve_order = before


def actor_pool(concurrency: int | tuple[int, int]):
    """The spec's concurrency (a fixed count, or [min, max]) as Ray Data's actor pool strategy."""
    from ray.data import ActorPoolStrategy

    if isinstance(concurrency, int):
        return ActorPoolStrategy(size=concurrency)
    low, high = concurrency
    return ActorPoolStrategy(min_size=low, max_size=high)


def actor_resources(resources: dict[str, float]) -> dict:
    """A spec's `resources` mapping -> Ray Data `map_batches` resource arguments."""
    rest = {k: v for k, v in resources.items() if k not in ("CPU", "GPU")}
    out: dict[str, float | dict[str, float]] = {
        "num_cpus": resources.get("CPU", 1),
        "num_gpus": resources.get("GPU", 0),
    }
    if rest:
        out["resources"] = rest
    return out


def one_batch_per_block(dataset, batch_size: int):
    """Cut a dataset into blocks of `batch_size` rows, so an actor pool gets one batch per task.

    Ray Data gives one task a whole block however big; a small input (one Parquet row group) would
    then be one task: one busy actor whatever the pool size, no output until it ends, and all of it
    redone if its actor dies. Cut per batch, work spreads over the pool, results stream out, and a
    killed actor costs only the batches it had in flight.
    """
    return dataset.repartition(target_num_rows_per_block=batch_size)


def fixed_batches(dataset, batch_size: int, num_rows: int):
    """Blocks of at most `batch_size` rows cut by row position alone (rows i*n/k ... (i+1)*n/k).

    A row's reward moves in the last bits with the rows batched beside it, so a rerun must batch the
    same rows together. Ray Data's streaming cut (`one_batch_per_block`) follows the block boundaries
    of the tasks before it, which vary from run to run after a sort; a repartition into a fixed
    number of blocks does not. Measured: the same 129 sorted rows gave 3 different batchings in 3
    runs with the streaming cut, the same one with this.
    """
    return dataset.repartition(max(1, -(-num_rows // batch_size)))
