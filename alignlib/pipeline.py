"""The flow: prompts -> generate -> score -> pairs -> [ref_logps] -> train -> export -> eval, top to bottom.

Each stage function reads its inputs from the stage store and writes its tables into a
`StageWriter`; `Pipeline.run` skips a stage whose output is complete and was made from the same
spec sections and inputs (its fingerprint), so a killed job resumes where it stopped. With
`data.kind: preferences` the imported pairs go from `prompts` straight to `pairs` (no generate, score).

    Pipeline(load_spec("jobs/demo.yaml")).run()            # everything
    Pipeline(spec).run(["score"])                           # one stage, inputs must exist
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow as pa

from alignlib import schema as S
from alignlib.redaction import redact
from alignlib.spec import JobSpec, eval_temperature, remote_code_models, stage_sections
from alignlib.store import (
    ROWS_PER_FILE,
    STAGES,
    StageStore,
    StageWriter,
    count_rows,
    fingerprint,
    read_table,
    write_table,
)
from alignlib.verify import KEY, check_completions, check_scored

UPSTREAM = {
    "prompts": [],
    "generate": ["prompts"],
    "score": ["generate"],
    "pairs": ["score"],
    "ref_logps": ["pairs"],
    "train": ["pairs"],  # and ref_logps when train.precompute_reference
    "export": ["train"],
    "eval": ["prompts", "export"],
}


class StageInputError(RuntimeError):
    pass


def log(message: str) -> None:
    """One progress line on stdout; values of secret-looking environment variables are masked."""
    print(redact(f"[alignlib] {message}"), flush=True)


def init_ray(**kwargs) -> None:
    """`ray.init(**kwargs)`, tried up to three times: a local start on a busy machine can miss Ray's fixed
    30 s window for the raylet to register, with nothing else wrong."""
    import ray

    for attempt in range(1, 4):
        try:
            ray.init(**kwargs)
            return
        except Exception as err:
            if "timed out during startup" not in str(err) or attempt == 3:
                raise
            log(f"Ray's local start timed out (busy machine?); trying again ({attempt + 1}/3)")
            ray.shutdown()


def ensure_ray() -> None:
    """Attach to the cluster named by RAY_ADDRESS (`ray job submit` sets it) or start a local one."""
    import ray

    if not ray.is_initialized():
        init_ray(log_to_driver=True)
    # Let a stage's own error (a reward that failed on file:line) reach the user, not Ray Data's
    # generic "UDF failed to process a data block" wrapper.
    ray.data.DataContext.get_current().raise_original_map_exception = True


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


class Pipeline:
    def __init__(self, spec: JobSpec, force: bool = False):
        self.spec = spec
        self.store = StageStore(spec.output_dir)
        self.sections = stage_sections(spec)
        self.force = force
        self._fingerprints: dict[str, str] = {}

    def upstream(self, stage: str) -> list[str]:
        if stage == "train" and self.spec.train.precompute_reference:
            return ["ref_logps"]
        if stage == "pairs" and self.spec.data.kind == "preferences":
            return ["prompts"]  # an imported preference set skips generate and score
        return UPSTREAM[stage]

    def fingerprint(self, stage: str) -> str:
        if stage not in self._fingerprints:
            inputs = {u: self.fingerprint(u) for u in self.upstream(stage)}
            self._fingerprints[stage] = fingerprint(stage, self.sections[stage], inputs)
        return self._fingerprints[stage]

    def stages(self) -> list[str]:
        skipped = {"generate", "score"} if self.spec.data.kind == "preferences" else set()
        if not self.spec.eval.enabled:
            skipped.add("eval")
        if not self.spec.train.precompute_reference:
            skipped.add("ref_logps")
        return [s for s in STAGES if s not in skipped]

    def check_remote_code(self) -> None:
        """Say which models may run their own code; refuse a local model that ships code the spec did not allow."""
        from alignlib.models import check_remote_code

        for field, model, trusted in remote_code_models(self.spec):
            if trusted:
                log(f"{field} is true: model {model} may run Python code shipped with it when loaded")
            else:
                check_remote_code(model, trusted, field)

    def run(self, only: list[str] | None = None) -> dict[str, dict[str, Any]]:
        self.check_remote_code()
        manifests = {}
        for stage in only or self.stages():
            fp = self.fingerprint(stage)
            if not self.force and self.store.is_complete(stage, fp):
                log(f"{stage}: complete, skipped ({self.store.path(stage)})")
                manifests[stage] = self.store.manifest(stage)
                continue
            if stage in ("generate", "score") and self.spec.data.kind == "preferences":
                raise StageInputError(f"stage {stage!r}: data.kind is preferences, which has no {stage} stage")
            for upstream in self.upstream(stage):
                if not self.store.is_complete(upstream, self.fingerprint(upstream)):
                    raise StageInputError(
                        f"stage {stage!r} needs the output of {upstream!r} for this spec at "
                        f"{self.store.path(upstream)}, which is missing or was made from a different spec; "
                        f"run `alignlib {upstream} JOB.yaml` (or `alignlib run JOB.yaml`) first"
                    )
            log(f"{stage}: running")
            started = time.time()
            with self.store.writer(stage) as writer:
                stats = STAGE_FUNCTIONS[stage](self, writer)
                inputs = {u: self.fingerprint(u) for u in self.upstream(stage)}
                manifests[stage] = writer.commit(fp, inputs, stats)
            log(
                f"{stage}: done in {time.time() - started:.1f}s -> {self.store.path(stage)}  {_brief(manifests[stage])}"
            )
        return manifests

    def table_path(self, stage: str, table: str) -> Path:
        return self.store.path(stage) / table


def _brief(manifest: dict[str, Any]) -> str:
    return " ".join(f"{name}={rows}" for name, rows in manifest["tables"].items())


# -- stages -------------------------------------------------------------------------------------


def run_prompts(p: Pipeline, out: StageWriter) -> dict[str, Any]:
    import shutil

    from alignlib.prompts import all_rejected, load_data, split, to_table

    data = p.spec.data
    fits = None
    if data.kind == "prompts":  # these prompts go to generation: each must fit the models' context
        from alignlib.context import ContextCheck

        fits = ContextCheck(p.spec)
    # Where the rejected rows of a run that kept none go: the stage itself is not committed then.
    failed = p.store.root / "prompts.failed"
    shutil.rmtree(failed, ignore_errors=True)
    loaded = load_data(data, fits)
    rejected = to_table(loaded.rejected, S.REJECTED_ROW_COLUMNS)
    if not loaded.prompts:
        write_table(rejected, failed / "rejected_rows")
        raise all_rejected(data, loaded, failed / "rejected_rows")
    train, held_out = split(loaded.prompts, data.eval_fraction, p.spec.seed)
    write_table(to_table(train), out.table("train"))
    write_table(to_table(held_out), out.table("eval"))
    if data.kind == "preferences":
        write_table(to_table(loaded.preferences, S.PREFERENCE_COLUMNS), out.table("preferences"))
    counts = loaded.counts(data)
    if data.on_bad_rows == "reject":
        write_table(rejected, out.table("rejected_rows"))
        if loaded.rejected:
            log(f"prompts: {len(loaded.rejected)} bad row(s) set aside {counts['rejected']} -> "
                f"{p.store.path('prompts') / 'rejected_rows'}")  # fmt: skip
    return {"prompts": len(loaded.prompts), **counts}


def _sampling(spec: JobSpec, temperature: float | None = None):
    from alignlib.generate import Sampling

    g = spec.generate
    return Sampling(g.max_new_tokens, g.temperature if temperature is None else temperature, g.top_p)


def run_generate(p: Pipeline, out: StageWriter) -> dict[str, Any]:
    import ray

    from alignlib.generate import generate, reference_rows

    ensure_ray()
    spec, g = p.spec, p.spec.generate
    jobs = [(S.GENERATOR_POLICY, spec.policy, g.num_samples)]
    if g.weak_model is not None:
        jobs.append((S.GENERATOR_WEAK, g.weak_model, g.weak_model.num_samples))
    # vLLM schedules requests into its own batches as they come (continuous batching), so its numbers
    # are not batch-reproducible anyway; ordering its output would only hold finished rows back behind a
    # slow replica. The transformers engine is reproducible to the byte when its batches are.
    with ordered_data(enabled=g.engine == "transformers"):
        prompts = ray.data.read_parquet(str(p.table_path("prompts", "train")))
        # One model at a time: each engine gets the whole cluster instead of competing for it.
        for generator, model, n in jobs:
            log(f"generate: {n} sample(s) per prompt from {generator} model {model.model} ({g.engine})")
            generate(prompts, model, _sampling(spec), g, generator, n, spec.seed).write_parquet(
                str(out.table("completions") / generator), min_rows_per_file=ROWS_PER_FILE
            )
        if spec.data.reference_field is not None:
            prompts.map_batches(reference_rows, batch_format="pyarrow").write_parquet(
                str(out.table("completions") / S.GENERATOR_REFERENCE), min_rows_per_file=ROWS_PER_FILE
            )
    check_completions(out.table("completions"), _expected_completions(p, jobs))
    return {"engine": g.engine}


def _expected_completions(p: Pipeline, jobs: list[tuple[str, Any, int]]) -> dict[str, tuple[list[str], int]]:
    """generator -> (prompt ids, samples per prompt) the generate stage must write, each row once."""
    prompts = read_table(p.table_path("prompts", "train")).select([S.PROMPT_ID, S.REFERENCE]).to_pylist()
    expected = {generator: ([r[S.PROMPT_ID] for r in prompts], n) for generator, _, n in jobs}
    if p.spec.data.reference_field is not None:
        expected[S.GENERATOR_REFERENCE] = ([r[S.PROMPT_ID] for r in prompts if r[S.REFERENCE] is not None], 1)
    return expected


def run_score(p: Pipeline, out: StageWriter) -> dict[str, Any]:
    import ray

    from alignlib.score import score

    ensure_ray()
    with ordered_data():
        # Sorted by key and cut into batches by position, so each reward batch holds the same rows
        # whatever order generate wrote them in: Ray Data can put a batch it retried, or held back, later
        # in the file, and a row's reward moves in the last bits with its batch neighbours.
        source = p.table_path("generate", "completions")
        completions = ray.data.read_parquet(str(source)).sort(list(KEY))
        score(completions, p.spec.score, num_rows=count_rows(source)).write_parquet(
            str(out.table("scored")), min_rows_per_file=ROWS_PER_FILE
        )
    check_scored(out.table("scored"), p.table_path("generate", "completions"))
    table = read_table(out.table("scored"))
    columns = [S.REWARD] + [c for c, _, _ in p.spec.score.components() if c != S.REWARD]
    return {f"{c}_mean": _mean(table[c].to_pylist()) for c in columns}


def run_pairs(p: Pipeline, out: StageWriter) -> dict[str, Any]:
    from alignlib.losses import get_loss
    from alignlib.pairs import build, import_pairs
    from alignlib.quality import data_quality, imported_completions, render_html

    spec = p.spec.pairs
    if p.spec.data.kind == "preferences":
        preferences = read_table(p.table_path("prompts", "preferences")).to_pylist()
        train_ids = set(read_table(p.table_path("prompts", "train"))[S.PROMPT_ID].to_pylist())
        pairs, sft, counts = import_pairs(preferences, train_ids, spec)
        completions = imported_completions(pairs)
    else:
        # In key order: the pairs file is then the same bytes whatever order Ray Data wrote the rows in.
        scored = read_table(p.table_path("score", "scored")).sort_by([(c, "ascending") for c in KEY]).to_pylist()
        pairs, sft, counts = build(scored, spec, p.spec.seed)
        completions = scored
    quality = data_quality(completions, pairs, counts)
    (out.path / "report.html").write_text(render_html(quality, f"alignlib {p.spec.name}: preference data"))
    needed = pairs if get_loss(p.spec.train.loss.name).paired else sft
    if not needed:
        hint = (
            "check the preference file (every pair identical, repeated or held out?)"
            if p.spec.data.kind == "preferences"
            else "lower pairs.min_margin, raise generate.num_samples, or add a weak model and gold_vs_weak"
        )
        raise StageInputError(
            f"pairs: no training examples survived for loss {p.spec.train.loss.name!r} (counts: {counts}); {hint}"
        )
    write_table(pa.Table.from_pylist(pairs, schema=S.arrow_schema(S.PAIR_COLUMNS)), out.table("pairs"))
    write_table(pa.Table.from_pylist(sft, schema=S.arrow_schema(S.SFT_COLUMNS)), out.table("sft"))
    return {**counts, "quality": quality}


def run_train(p: Pipeline, out: StageWriter) -> dict[str, Any]:
    import ray

    from alignlib.losses import get_loss
    from alignlib.train.launch import metrics_path, read_metrics, run_training

    ensure_ray()
    table = "pairs" if get_loss(p.spec.train.loss.name).paired else "sft"
    source = "ref_logps" if p.spec.train.precompute_reference else "pairs"
    # Read before the workers start: once they hold their CPUs, a read task could wait forever.
    dataset = ray.data.read_parquet(str(p.table_path(source, table))).materialize()
    n = dataset.count()
    backend = p.spec.train.backend
    log(f"train: {p.spec.train.loss.name} on {n} {table} rows, backend {backend.name} x{backend.num_workers}")
    run_name = f"{p.spec.name}-{p.fingerprint('train')}"
    result = run_training(p.spec, dataset, n, run_name=run_name)
    if result.error is not None:
        raise RuntimeError(f"training failed: {result.error}") from result.error
    epochs, steps = read_metrics(metrics_path(p.spec, run_name))
    write_table(pa.Table.from_pylist(epochs), out.table("metrics"))
    if steps:
        write_table(pa.Table.from_pylist(steps), out.table("steps"))
    return {"checkpoint": result.checkpoint.path, "examples": n, "final_metrics": _jsonable(result.metrics)}


def run_ref_logps(p: Pipeline, out: StageWriter) -> dict[str, Any]:
    import ray

    from alignlib.train.reference import reference_logps

    ensure_ray()
    with ordered_data():
        pairs = ray.data.read_parquet(str(p.table_path("pairs", "pairs"))).materialize()
        rows = pairs.count()
        log(f"ref_logps: reference log-probs of {rows} pairs under {p.spec.policy.model}")
        reference_logps(pairs, p.spec).write_parquet(str(out.table("pairs")))
    written = count_rows(out.table("pairs"))
    if written != rows:
        raise RuntimeError(f"ref_logps: {rows} pairs in, {written} rows out; refusing to trust the output")
    return {"pairs": rows}


def run_export(p: Pipeline, out: StageWriter) -> dict[str, Any]:
    import ray

    from alignlib.export import export_model

    ensure_ray()
    checkpoint = Path(p.store.manifest("train")["stats"]["checkpoint"])
    if not (checkpoint / "model").exists():
        raise StageInputError(f"export: the training checkpoint {checkpoint} is gone; rerun `alignlib train`")
    target = out.path / "model"
    task = ray.remote(num_cpus=1)(export_model)
    policy = p.spec.policy
    kind = ray.get(task.remote(str(checkpoint / "model"), str(target), policy.model, p.spec.export.merge_lora,
                               policy.trust_remote_code))  # fmt: skip
    return {"kind": kind, "source": str(checkpoint / "model"), "model": str(p.store.path("export") / "model")}


def run_eval(p: Pipeline, out: StageWriter) -> dict[str, Any]:
    import ray

    from alignlib.generate import generate
    from alignlib.score import score
    from alignlib.spec import ModelSpec

    ensure_ray()
    spec = p.spec
    # The export keeps the policy's own code (if any), so it is trusted exactly as far as the policy is.
    trained = ModelSpec(model=str(p.store.path("export") / "model"), chat_template=spec.policy.chat_template,
                        dtype=spec.policy.dtype, trust_remote_code=spec.policy.trust_remote_code)  # fmt: skip
    sampling = _sampling(spec, eval_temperature(spec))
    with ordered_data():
        prompts = ray.data.read_parquet(str(p.table_path("prompts", "eval")))
        for generator, model in ((S.GENERATOR_BASE, spec.policy), (S.GENERATOR_TRAINED, trained)):
            log(f"eval: sampling the {generator} policy on held-out prompts")
            completions = generate(prompts, model, sampling, spec.generate, generator, spec.eval.num_samples,
                                   spec.seed, seed_key="eval").materialize()  # fmt: skip
            score(completions, spec.score).write_parquet(str(out.table("completions") / generator))
    rows = read_table(out.table("completions")).to_pylist()
    summary = summarize(rows)
    (out.path / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean reward of base and trained policy, and the trained policy's win rate over prompts.

    Per prompt, each policy's reward is its mean over samples; a win counts 1, a tie 0.5.
    """
    per_prompt: dict[str, dict[str, list[float]]] = {}
    for r in rows:
        per_prompt.setdefault(r[S.PROMPT_ID], {}).setdefault(r[S.GENERATOR], []).append(r[S.REWARD])
    base = [_mean(v[S.GENERATOR_BASE]) for v in per_prompt.values()]
    trained = [_mean(v[S.GENERATOR_TRAINED]) for v in per_prompt.values()]
    wins = [1.0 if t > b else 0.5 if t == b else 0.0 for b, t in zip(base, trained, strict=True)]
    return {
        "prompts": len(per_prompt),
        "base_mean_reward": _mean(base),
        "trained_mean_reward": _mean(trained),
        "win_rate": _mean(wins),
    }


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _jsonable(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in (metrics or {}).items() if isinstance(v, (int, float, str, bool))}


STAGE_FUNCTIONS = {
    "prompts": run_prompts,
    "generate": run_generate,
    "score": run_score,
    "pairs": run_pairs,
    "ref_logps": run_ref_logps,
    "train": run_train,
    "export": run_export,
    "eval": run_eval,
}
