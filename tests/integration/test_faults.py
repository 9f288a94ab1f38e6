"""Faults injected for real into the generate and score stages, and reruns that must give the same bytes.

One job (conftest's small job: 43 training prompts, 2 policy samples each plus the gold answer, the
transformers engine, the builtin:tiny-reward model) runs up to `pairs` in these ways, all on the session's
local Ray:

- reference: uninterrupted, in this process (the session's `small_job` run); a rerun of the same spec in
  another process on another Ray gives equal tables (test_rounds, round 2 of its killed run);
- `alignlib run JOB.yaml --until pairs` in its own process group, writing to a real S3 server (SeaweedFS;
  the commit protocol there is attempt prefixes and a manifest written last), three times:
  1. the whole job SIGKILLed while generate is mid-way (its attempt already holds Parquet, uncommitted);
  2. rerun: the engine actor SIGKILLed after it started 3 batches (Ray restarts it), generate finishes;
     then the whole job SIGKILLed while the reward actor is mid-way through the score stage;
  3. rerun: the reward actor SIGKILLed after 3 batches (Ray restarts it), the job finishes;
  after which completions, scores and pairs must equal the local reference (the pairs byte for byte): no
  row lost, none twice, and no half-written attempt ever read;
- a finished run tampered with (a Parquet file deleted, a manifest cut short): the rerun redoes those stages.

Actors are found by their process title (`ray::MapWorker(MapBatches(HFGenerator)).submit` while a batch
runs) among this test process's descendants: the session's Ray was started here, so its workers are ours.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest

from alignlib import schema as S
from alignlib.locations import RemotePath
from alignlib.store import StageStore, read_table
from alignlib.verify import KEY

sys.path.insert(0, str(Path(__file__).parent))
from conftest import SAMPLES, TRAIN_PROMPTS, UPSTREAM, run_in_process  # noqa: E402
from s3_server import BUCKET  # noqa: E402

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SINGLE_FILE_TABLES = [("prompts", "train"), ("prompts", "eval"), ("pairs", "pairs"), ("pairs", "sft")]


@pytest.fixture(scope="module")
def spec_file(small_job_file):
    return small_job_file


@pytest.fixture(scope="module")
def reference(small_job):
    return small_job


@pytest.fixture(scope="module")
def second(reference, tmp_path_factory):
    """A copy of the reference run, for the tests that tamper with a finished run."""
    run = tmp_path_factory.mktemp("second") / "run"
    shutil.copytree(reference, run)
    return run


def rows(run: Path | RemotePath, stage: str, table: str) -> list[dict]:
    return read_table(StageStore(run).path(stage) / table).to_pylist()


def by_key(table_rows: list[dict]) -> dict[tuple, dict]:
    keyed = {tuple(r[c] for c in KEY): r for r in table_rows}
    assert len(keyed) == len(table_rows), "a (prompt_id, generator, sample_index) key appears twice"
    return keyed


def assert_exact_completions(run: Path, stage: str = "generate", table: str = "completions") -> None:
    """One row per prompt and policy sample, one gold answer per prompt, no key twice."""
    found = rows(run, stage, table)
    counts = {g: sum(r[S.GENERATOR] == g for r in found) for g in (S.GENERATOR_POLICY, S.GENERATOR_GOLD)}
    assert counts == {S.GENERATOR_POLICY: TRAIN_PROMPTS * SAMPLES, S.GENERATOR_GOLD: TRAIN_PROMPTS}
    assert len(by_key(found)) == TRAIN_PROMPTS * (SAMPLES + 1)


def assert_same_outputs(run: Path, reference: Path) -> None:
    """Prompts and pairs byte for byte; completions and scores row for row, value for value.

    Not in file order: Ray Data can put a batch it retried (after a killed actor) or held back later in
    a stage's file, even with `preserve_order` (seen in CI, on a kill and once without one). Scoring
    reads completions sorted by key, and pairs are built in key order, so neither depends on it.
    """
    for stage, table in SINGLE_FILE_TABLES:
        assert (StageStore(run).path(stage) / table / "part-00000.parquet").read_bytes() == (
            reference / stage / table / "part-00000.parquet"
        ).read_bytes(), f"{stage}/{table} differs"
    for stage, table in (("generate", "completions"), ("score", "scored")):
        got, want = rows(run, stage, table), rows(reference, stage, table)
        assert len(got) == len(want)
        assert by_key(got) == by_key(want), f"{stage}/{table}: some row differs from the reference"


# -- determinism --------------------------------------------------------------------------------


def test_reference_run_has_every_row_once(reference):
    assert_exact_completions(reference)
    scored = rows(reference, "score", "scored")
    assert by_key(scored).keys() == by_key(rows(reference, "generate", "completions")).keys()
    assert {r[S.REWARD_SOURCE] for r in scored} == {"builtin:tiny-reward"}
    assert len(rows(reference, "pairs", "pairs")) == TRAIN_PROMPTS


def test_manifests_record_the_versions_that_made_each_output(second):
    for stage in UPSTREAM:
        versions = json.loads((second / stage / "manifest.json").read_text())["versions"]
        assert {"python", "ray", "torch", "transformers", "pyarrow", "alignlib"} <= versions.keys(), stage


# -- tampered outputs ---------------------------------------------------------------------------


def test_a_tampered_stage_is_redone_not_trusted(second, spec_file, tmp_path, capsys):
    run = tmp_path / "tampered"
    shutil.copytree(second, run)
    (run / "prompts" / "eval" / "part-00000.parquet").unlink()  # a table lost a file
    manifest = run / "pairs" / "manifest.json"
    manifest.write_text(manifest.read_text()[:40])  # a manifest cut short

    run_in_process(spec_file, run)

    log = capsys.readouterr().out
    assert "prompts: running" in log and "pairs: running" in log
    assert "generate: complete, skipped" in log and "score: complete, skipped" in log
    assert_same_outputs(run, second)


def test_completions_in_another_order_give_the_same_scores_and_pairs(second, spec_file, tmp_path, capsys):
    """What a retried or held-back generation batch does to the file (its rows land later) must not reach
    the rewards or the pairs."""
    run = tmp_path / "reordered"
    shutil.copytree(second, run)
    for stage in ("score", "pairs"):
        shutil.rmtree(run / stage)
    (policy_file,) = (run / "generate" / "completions" / S.GENERATOR_POLICY).glob("*.parquet")
    table = pq.read_table(policy_file)
    pq.write_table(table.take(list(range(table.num_rows))[::-1]), policy_file)  # same rows, reversed
    assert rows(run, "generate", "completions") != rows(second, "generate", "completions")

    run_in_process(spec_file, run)

    assert "generate: complete, skipped" in capsys.readouterr().out
    assert_same_outputs(run, second)


# -- killed actors and killed jobs --------------------------------------------------------------


class ActorWatcher(threading.Thread):
    """Watches the Ray actor running `udf`; once it has started `after` batches, SIGKILLs it (if `kill`).

    `hit` is the pid the actor had then. `replaced` turns true when another process runs a batch of `udf`
    after the kill: Ray restarted the actor and there was work left for it, so the kill landed mid-stage.
    Processes that existed before the watcher started (actors of an earlier run) are ignored.
    """

    def __init__(self, udf: str, after: int = 3, kill: bool = True):
        super().__init__(daemon=True)
        self.title, self.after, self.kill = f"MapBatches({udf})", after, kill
        self.hit: int | None = None
        self.replaced = False
        self.done = threading.Event()
        self.me = psutil.Process()
        self.earlier = {p.pid for p in self.me.children(recursive=True)}

    def run(self) -> None:
        busy, started = {}, {}
        while not self.done.is_set():
            for proc in self.me.children(recursive=True):
                try:
                    title = " ".join(proc.cmdline())
                except psutil.Error:
                    continue
                if self.title not in title or proc.pid in self.earlier:
                    continue
                running = title.rstrip().endswith(".submit")
                if running and not busy.get(proc.pid):
                    started[proc.pid] = started.get(proc.pid, 0) + 1
                busy[proc.pid] = running
                if self.hit is None and started.get(proc.pid, 0) >= self.after:
                    if self.kill:
                        os.kill(proc.pid, signal.SIGKILL)
                    self.hit = proc.pid
                elif self.hit is not None and proc.pid != self.hit and running:
                    self.replaced = True
            time.sleep(0.01)

    def stop(self) -> None:
        self.done.set()
        self.join()


def start_job(spec_file: Path, run: Path, *overrides: str) -> subprocess.Popen:
    """`alignlib run JOB.yaml --until pairs` in its own process group, as a driver of the session's Ray."""
    import ray

    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    return subprocess.Popen(
        [sys.executable, "-m", "alignlib", "run", str(spec_file), f"output_dir={run}", *overrides, "--until", "pairs"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def kill_job_when(proc: subprocess.Popen, ready, what: str, timeout: float = 400) -> str:
    """SIGKILL the job's whole process group as soon as `ready()`; its output so far."""
    deadline = time.time() + timeout
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"the job ended before {what}:\n{proc.stdout.read()[-3000:]}")
        if time.time() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"no sign of {what} within {timeout}s")
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    out, _ = proc.communicate()
    return out


def finish(proc: subprocess.Popen, timeout: float = 400) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:]
    return out


def in_store(run: RemotePath) -> dict[str, tuple[bool, int]]:
    """stage -> (committed: its manifest exists, how many attempt prefixes hold Parquet files).

    Files, not prefixes: SeaweedFS keeps listing a directory whose objects were all deleted (S3 does not)."""

    def attempts(stage: RemotePath) -> int:
        return sum(any(f.suffix == ".parquet" for f in a.rglob("*")) for a in stage.glob("attempt-*"))

    return {d.name: ((d / "manifest.json").exists(), attempts(d)) for d in run.iterdir()}


@pytest.fixture(scope="module")
def killed_runs(reference, spec_file, s3_server):
    """The three runs of one output_dir in S3 described at the top; what each one left and printed."""
    run, seen = RemotePath(f"s3://{BUCKET}/killed-{uuid.uuid4().hex[:8]}"), {}

    # 1. Killed while generate is mid-way: the policy completions are written, the gold answers not yet.
    proc = start_job(spec_file, run)
    kill_job_when(proc, lambda: bool((run / "generate").rglob("*.parquet")), "generate output")
    seen["after_kill_1"] = in_store(run)

    # 2. Rerun; the engine actor killed mid-stage; then the whole job killed while the reward actor works.
    engine, scorer = ActorWatcher("HFGenerator"), ActorWatcher("ModelScorer", kill=False)
    engine.start()
    scorer.start()
    proc = start_job(spec_file, run)
    seen["log_2"] = kill_job_when(proc, lambda: scorer.hit is not None, "the reward actor at work")
    engine.stop()
    scorer.stop()
    seen["engine"], seen["after_kill_2"] = engine, in_store(run)

    # 3. Rerun; the reward actor killed mid-stage; the job finishes.
    scorer = ActorWatcher("ModelScorer")
    scorer.start()
    seen["log_3"] = finish(start_job(spec_file, run))
    scorer.stop()
    seen["scorer"] = scorer
    return run, seen


def test_killed_engine_actor_is_restarted_and_no_completion_is_lost_or_repeated(killed_runs, reference):
    run, seen = killed_runs
    assert seen["engine"].hit is not None and seen["engine"].replaced, "the engine actor was not killed mid-stage"
    assert "generate: done" in seen["log_2"]
    assert_exact_completions(run)
    assert by_key(rows(run, "generate", "completions")) == by_key(rows(reference, "generate", "completions"))


def test_killed_reward_actor_is_restarted_and_no_score_is_lost_or_repeated(killed_runs, reference):
    run, seen = killed_runs
    assert seen["scorer"].hit is not None and seen["scorer"].replaced, "the reward actor was not killed mid-stage"
    scored = rows(run, "score", "scored")
    assert len(scored) == TRAIN_PROMPTS * (SAMPLES + 1)
    assert by_key(scored) == by_key(rows(reference, "score", "scored"))


def test_killed_job_reruns_only_what_was_not_finished(killed_runs, reference):
    run, seen = killed_runs
    # Killed in generate: prompts committed; generate only a half-written attempt, with no manifest.
    assert seen["after_kill_1"]["prompts"] == (True, 1)
    assert seen["after_kill_1"]["generate"] == (False, 1)
    # Killed in score: the rerun skipped prompts and redid generate (never trusting the half-written attempt,
    # whose files are gone), which is now committed; score is an uncommitted attempt.
    assert "prompts: complete, skipped" in seen["log_2"] and "generate: running" in seen["log_2"]
    assert seen["after_kill_2"]["generate"] == (True, 1) and seen["after_kill_2"]["score"][0] is False
    # The last run redid only score and pairs, and left one attempt per stage, the committed one.
    for stage in ("prompts", "generate"):
        assert f"{stage}: complete, skipped" in seen["log_3"]
    assert "score: running" in seen["log_3"] and "pairs: running" in seen["log_3"]
    assert in_store(run) == {stage: (True, 1) for stage in UPSTREAM}
    assert_same_outputs(run, reference)


def test_a_batch_that_kills_its_worker_every_time_fails_the_stage_instead_of_retrying_for_ever(
    second, spec_file, tmp_path
):
    """Ray Data restarts a dead actor or worker and retries its batch without a limit. A reward function that
    kills its process on some prompts (as a crash in native code would) stops the job after 3 deaths of one
    batch, naming the batch's prompts; the score stage commits nothing."""
    run = tmp_path / "deadly"
    shutil.copytree(second, run)
    reward = "score.reward={type: function, function: 'tests.integration.crashing_reward:dies_on_plus_one'}"
    proc = start_job(spec_file, run, reward)
    out, _ = proc.communicate(timeout=400)
    assert proc.returncode == 1, out[-3000:]
    errors = [line for line in out.splitlines() if line.startswith("alignlib: error:")]
    assert len(errors) == 1, out[-3000:]
    assert errors[0].startswith(
        "alignlib: error: reward tests.integration.crashing_reward:dies_on_plus_one: a batch of "
    ), errors
    assert " rows (prompts " in errors[0] and "addition.jsonl:" in errors[0], errors
    assert "was started 3 times and the process running it died each time" in errors[0], errors
    assert errors[0].endswith("not tried again"), errors
    assert "generate: complete, skipped" in out and "score: running" in out
    assert json.loads((run / "score" / "manifest.json").read_text()) == json.loads(
        (second / "score" / "manifest.json").read_text()
    ), "the finished score stage of the working reward is kept"
