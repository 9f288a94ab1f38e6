"""Every stage of a job, declared once, as data; the pipeline, fingerprints, CLI and Kubernetes sizing read `STAGES`.

A `Stage` says what it is called, what it does (`run`), which stages it reads and which of their
columns (`inputs`, `reads`), which spec sections its output depends on (`sections`, hashed into its
fingerprint), when a job has it (`enabled`), the tables it writes, and what it asks Ray for
(`demands`, which sizes the Kubernetes worker groups). Adding a stage or a flow is one more entry.

    prompts -> generate -> score -> pairs -> [ref_logps] -> train -> export -> eval

Each `run` function reads its inputs from the stage store and writes its tables into a `StageWriter`;
heavy imports (Ray, torch, vLLM) happen inside them, so reading this list (the CLI, `alignlib k8s`)
stays light.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from alignlib import schema as S
from alignlib.progress import Progress, counted
from alignlib.raydata import ensure_ray, log, ordered_data
from alignlib.sources import data_digest, model_digest, reward_digests
from alignlib.spec import LOSSES_NEEDING_PAIRS, JobSpec, eval_temperature, reference_source
from alignlib.store import (
    ROWS_PER_FILE,
    StageStore,
    StageWriter,
    StorePath,
    copytree,
    count_rows,
    location,
    move,
    read_table,
    rmtree,
    write_table,
)
from alignlib.verify import KEY, StageOutputError, check_completions, check_scored


class Pipeline(Protocol):
    """What a stage's `run` gets from the pipeline running it (`alignlib.pipeline.Pipeline`)."""

    spec: JobSpec
    store: StageStore
    force: bool  # redo the work even where a finished (or half-finished) result exists
    round: int | None  # K in round K of a multi-round job (`alignlib.rounds`); None for a single pass
    earlier: list[Pipeline]  # the rounds before this one, oldest first
    ahead: Pipeline | None  # the round whose candidates this one's held-out sampling may draw too (`sample_ahead`)

    def fingerprint(self, name: str) -> str: ...

    def table_path(self, name: str, table: str) -> StorePath: ...


class StageInputError(RuntimeError):
    """A stage cannot run on what it was given (missing or mismatched inputs, nothing left to train on)."""


@dataclass(frozen=True)
class Demand:
    """What one stage asks Ray for at its peak: `count` actors (or Train workers), each needing `per_actor`.

    `field` is the spec field that sets it, for error messages (`alignlib k8s` refusing an actor no pod fits).
    """

    stage: str
    field: str
    count: int
    per_actor: dict[str, float]


def _nothing(spec: JobSpec) -> Any:
    return {}


@dataclass(frozen=True)
class Stage:
    name: str
    help: str
    run: Callable[[Pipeline, StageWriter], dict[str, Any]]
    sections: Callable[[JobSpec], dict[str, Any]]
    inputs: Callable[[JobSpec], list[str]] = lambda spec: []
    reads: Callable[[JobSpec], dict[str, list[str]]] = _nothing  # "stage/table" -> columns this stage reads
    tables: tuple[str, ...] = ()
    enabled: Callable[[JobSpec], bool] = lambda spec: True
    enabled_when: str = ""  # the condition `enabled` checks, in words, for error messages
    demands: Callable[[JobSpec], list[Demand]] = lambda spec: []
    flows: tuple[str, ...] = ("train",)  # the flows that have this stage: `train` (alignlib run), `bon` (alignlib bon)


def _model(model) -> dict[str, Any]:
    """A model spec in a fingerprint: its settings, and the model itself by content (`sources.model_digest`)."""
    return {**model.model_dump(mode="json"), "model": model_digest(model.model)}


def _score(spec: JobSpec) -> dict[str, Any]:
    """The score section in a fingerprint: its settings, and each reward by content (model files, function source)."""
    return {**spec.score.model_dump(mode="json"), "contents": reward_digests(spec)}


def _most(concurrency: int | tuple[int, int]) -> int:
    return concurrency if isinstance(concurrency, int) else concurrency[1]


def _parallel(engine_kwargs: dict[str, Any]) -> int:
    """vLLM replicas reserve one placement-group bundle per tensor/pipeline-parallel worker."""
    return int(engine_kwargs.get("tensor_parallel_size", 1)) * int(engine_kwargs.get("pipeline_parallel_size", 1))


def _generate_demands(spec: JobSpec, stage: str = "generate") -> list[Demand]:
    g = spec.generate
    if g.engine == "vllm":
        engine = {k: v * _parallel(g.engine_kwargs) for k, v in g.resources.items()}
    else:
        engine = {"CPU": 1.0, **g.resources}  # Ray Data's default for an actor without num_cpus
    return [Demand(stage, "generate.resources", _most(g.concurrency), engine)]


def _score_demands(spec: JobSpec, stage: str = "score") -> list[Demand]:
    out = []
    components = spec.score.components()
    for i, (_, reward, _) in enumerate(components):
        where = f"score.rewards[{i}]" if spec.score.rewards else "score.reward"
        if reward.type == "model":
            if reward.engine == "vllm":
                per_actor = {k: v * _parallel(reward.engine_kwargs) for k, v in reward.resources.items()}
            else:
                per_actor = {"CPU": 1.0, **reward.resources}
            out.append(Demand(stage, f"{where}.resources", _most(reward.concurrency), per_actor))
        else:
            out.append(Demand(stage, where, 1, {"CPU": 0.5}))
    return out


def _train_worker(spec: JobSpec) -> dict[str, float]:
    return {"CPU": 1.0, "GPU": 1.0} if spec.train.backend.use_gpu else {"CPU": 1.0}


def _generated(spec: JobSpec) -> bool:
    return spec.data.kind == "prompts"


def _train_settings(spec: JobSpec) -> dict[str, Any]:
    """The train section in a fingerprint; a reference model other than the policy, by content."""
    settings = spec.train.model_dump(mode="json")
    if spec.train.reference_model is not None:
        settings["reference_model"] = model_digest(spec.train.reference_model)
    return settings


def _training_table(spec: JobSpec) -> str:
    return "pairs" if LOSSES_NEEDING_PAIRS[spec.train.loss.name] else "sft"


def _training_source(spec: JobSpec) -> str:
    return "ref_logps" if reference_source(spec) == "precomputed" else "pairs"


# Made once per run and shared by every round of a multi-round job (at the top of output_dir).
SHARED = ("prompts", "baseline")


def _fresh(p: Pipeline) -> bool:
    """This round samples its own slice of the training prompts (`rounds.prompts: fresh`)."""
    return bool(p.round) and p.spec.rounds.prompts == "fresh"


def round_prompts(p: Pipeline):
    """The training prompts this round samples, as an Arrow table of prompt_id and gold: all of them, or its
    fresh slice."""
    import pyarrow as pa

    from alignlib.prompts import round_of

    table = read_table(p.table_path("prompts", "train"), columns=[S.PROMPT_ID, S.GOLD])
    if _fresh(p):
        seed, count = p.spec.seed, p.spec.rounds.count
        table = table.filter(pa.array([round_of(i, seed, count) == p.round for i in table[S.PROMPT_ID].to_pylist()]))
    return table


# -- prompts ----------------------------------------------------------------------------------


def _context_settings(spec: JobSpec) -> dict[str, Any] | None:
    """What the prompts stage's context-length check reads (see `alignlib.context`): changing it reruns the stage."""
    if spec.data.kind != "prompts":
        return None
    g = spec.generate
    models = [spec.policy] + ([g.weak_model] if g.weak_model is not None else [])
    return {
        "models": [[model_digest(m.model), m.chat_template] for m in models],
        "max_new_tokens": g.max_new_tokens,
        "max_model_len": g.engine_kwargs.get("max_model_len") if g.engine == "vllm" else None,
    }


def run_prompts(p: Pipeline, out: StageWriter) -> dict[str, Any]:
    from alignlib.prompts import all_rejected, load_data, split, to_table

    data = p.spec.data
    fits = None
    if data.kind == "prompts":  # these prompts go to generation: each must fit the models' context
        from alignlib.context import ContextCheck

        fits = ContextCheck(p.spec)
    # Where the rejected rows of a run that kept none go: the stage itself is not committed then.
    failed = p.store.root / "prompts.failed"
    rmtree(failed)
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


PROMPTS = Stage(
    name="prompts",
    help="read the data file, check every row, split train and held-out prompts",
    run=run_prompts,
    # The data file by content, not by path: an edited file reruns everything, a moved one nothing.
    sections=lambda spec: {
        "data": spec.data.model_dump(mode="json", exclude={"path"}), "content": data_digest(spec.data.path),
        "seed": spec.seed, "context": _context_settings(spec),
    },  # fmt: skip
    tables=("train", "eval", "preferences", "rejected_rows"),
    flows=("train", "bon"),
)


# -- generate ---------------------------------------------------------------------------------


def _sampling(spec: JobSpec, temperature: float | None = None):
    from alignlib.generate import Sampling

    g = spec.generate
    return Sampling(g.max_new_tokens, g.temperature if temperature is None else temperature, g.top_p)


def run_generate(p: Pipeline, out: StageWriter) -> dict[str, Any]:

    from alignlib.generate import generate, gold_rows

    ensure_ray()
    spec, g = p.spec, p.spec.generate
    jobs = [(S.GENERATOR_POLICY, spec.policy, g.num_samples)]
    if g.weak_model is not None:
        jobs.append((S.GENERATOR_WEAK, g.weak_model, g.weak_model.num_samples))
    # vLLM schedules requests into its own batches as they come (continuous batching), so its numbers
    # are not batch-reproducible anyway; ordering its output would only hold finished rows back behind a
    # slow replica. The transformers engine is reproducible to the byte when its batches are.
    with ordered_data(enabled=g.engine == "transformers"):
        prompts = _round_dataset(p)
        # One model at a time: each engine gets the whole cluster instead of competing for it.
        total = round_prompts(p).num_rows
        started = 0
        for generator, model, n in jobs:
            target = out.table("completions") / generator
            if generator == S.GENERATOR_WEAK and _reuse_weak(p, target):
                continue
            if generator == S.GENERATOR_POLICY and _adopt_ahead(p, target):
                continue
            key = _seed_key(p, generator)
            log(f"generate: {n} sample(s) per prompt from {generator} model {model.model} ({g.engine})")
            started += _most(g.concurrency)
            with Progress(f"generate ({generator})", total * n) as progress:
                completions = generate(prompts, model, _sampling(spec), g, generator, n, spec.seed, seed_key=key)
                counted(completions, progress).write_parquet(str(target), min_rows_per_file=ROWS_PER_FILE)
        if spec.data.gold_field is not None:
            prompts.map_batches(gold_rows, batch_format="pyarrow").write_parquet(
                str(out.table("completions") / S.GENERATOR_GOLD), min_rows_per_file=ROWS_PER_FILE
            )
    check_completions(out.table("completions"), _expected_completions(p, jobs))
    rmtree(_ahead_dir(p).parent)
    return {"engine": g.engine, "engine_starts": started, "policy": spec.policy.model}


def _round_dataset(p: Pipeline):
    """The training prompts this round samples, as a Ray Dataset (`round_prompts`)."""
    import ray

    prompts = ray.data.read_parquet(str(p.table_path("prompts", "train")))
    if _fresh(p):
        from alignlib.prompts import in_round
        from alignlib.raydata import LIGHT_CPUS

        prompts = prompts.map_batches(in_round, fn_args=(p.spec.seed, p.round, p.spec.rounds.count),
                                      batch_format="pyarrow", num_cpus=LIGHT_CPUS)  # fmt: skip
    return prompts


def _seed_key(p: Pipeline, generator: str) -> str:
    """Round K > 1 draws new seeds for the policy; the weak model's draws stay those of round 1."""
    if (p.round or 1) == 1 or generator == S.GENERATOR_WEAK:
        return generator
    return f"{generator}@round-{p.round}"


# -- sampling ahead: one engine for a model's held-out answers and the next round's candidates -------------

DONE = "_complete"


def _ahead_dir(p: Pipeline) -> StorePath:
    """Where candidates sampled ahead for this round's generate stage wait, keyed by its fingerprint."""
    return p.store.parent("generate") / ".ahead" / p.fingerprint("generate")


def _same_engine(a, b) -> bool:
    keys = {"engine", "engine_kwargs", "resources", "concurrency", "batch_size", "vllm_runner", "accelerator_type",
            "max_pending_requests"}  # fmt: skip
    return a.model_dump(include=keys) == b.model_dump(include=keys)


def sample_ahead(p: Pipeline, model) -> Any:
    """The next round's candidates as one more part of this held-out sampling, when the same engine can draw
    them: the next round (`p.ahead`) samples the same model with the same vLLM engine settings and its
    generate stage is still to do. Saves one engine start per round (vLLM only: its start is the cost;
    the transformers engine stays byte-reproducible by sampling each stage on its own)."""
    from alignlib.generate import Part

    nxt = getattr(p, "ahead", None)
    if nxt is None or p.spec.generate.engine != "vllm" or nxt.spec.policy != model:
        return None
    if not _same_engine(p.spec.generate, nxt.spec.generate) or not nxt.todo(["generate"]):
        return None
    g = nxt.spec.generate
    return Part(_round_dataset(nxt), S.GENERATOR_POLICY, g.num_samples, _sampling(nxt.spec), nxt.spec.seed,
                _seed_key(nxt, S.GENERATOR_POLICY))  # fmt: skip


def _adopt_ahead(p: Pipeline, target: StorePath) -> bool:
    ahead = _ahead_dir(p) / S.GENERATOR_POLICY
    if (p.force and not getattr(p, "ahead_fresh", False)) or not (ahead / DONE).exists():
        return False
    target.parent.mkdir(parents=True, exist_ok=True)
    (ahead / DONE).unlink()
    move(ahead, target)
    log(f"generate: the policy's {count_rows(target)} candidates were sampled ahead by the engine that "
        "answered the held-out prompts (no engine started)")  # fmt: skip
    return True


def _reuse_weak(p: Pipeline, target: StorePath) -> bool:
    """Rounds 2+ sampling the same prompts copy round 1's weak-model answers: same model, prompts and seeds,
    so the same answers, without starting its engine again."""
    if p.round is None or p.round == 1 or p.spec.rounds.prompts != "same":
        return False
    first = p.earlier[0].table_path("generate", "completions") / S.GENERATOR_WEAK
    if not first.is_dir():
        return False
    copytree(first, target)
    log(f"generate: weak model's answers reused from round 1 ({count_rows(target)} rows, no engine started)")
    return True


def _expected_completions(p: Pipeline, jobs: list[tuple[str, Any, int]]) -> dict[str, tuple[Any, int]]:
    """generator -> (prompt ids as an Arrow array, samples per prompt) the generate stage must write, each row once."""
    import pyarrow.compute as pc

    prompts = round_prompts(p)
    expected = {generator: (prompts[S.PROMPT_ID], n) for generator, _, n in jobs}
    if p.spec.data.gold_field is not None:
        expected[S.GENERATOR_GOLD] = (prompts.filter(pc.is_valid(prompts[S.GOLD]))[S.PROMPT_ID], 1)
    return expected


GENERATE = Stage(
    name="generate",
    help="sample N answers per prompt from the policy (and the weak model), in Ray Data engine actors",
    run=run_generate,
    sections=lambda spec: {
        "policy": _model(spec.policy), "seed": spec.seed,
        "generate": {**spec.generate.model_dump(mode="json"),
                     "weak_model": _model(spec.generate.weak_model) if spec.generate.weak_model else None},
    },  # fmt: skip
    inputs=lambda spec: ["prompts"],
    reads=lambda spec: {"prompts/train": S.PROMPT_COLUMNS},
    tables=("completions",),
    enabled=_generated,
    enabled_when="data.kind is prompts",
    demands=_generate_demands,
    flows=("train", "bon"),
)


# -- score ------------------------------------------------------------------------------------


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def run_score(p: Pipeline, out: StageWriter) -> dict[str, Any]:
    import ray

    from alignlib.score import score

    ensure_ray()
    with ordered_data():
        # Sorted by key and cut into batches by position, so each reward batch holds the same rows
        # whatever order generate wrote them in: Ray Data can put a batch it retried, or held back, later
        # in the file, and a row's reward moves in the last bits with its batch neighbours.
        source = p.table_path("generate", "completions")
        completions = ray.data.read_parquet(str(source))
        if any(reward.type == "model" for _, reward, _ in p.spec.score.components()):
            completions = completions.sort(list(KEY))  # a function's reward of a row has no neighbours
        rows = count_rows(source)
        with Progress("score", rows) as progress:
            counted(score(completions, p.spec.score, num_rows=rows), progress).write_parquet(
                str(out.table("scored")), min_rows_per_file=ROWS_PER_FILE
            )
    check_scored(out.table("scored"), p.table_path("generate", "completions"))
    columns = [S.REWARD] + [c for c, _, _ in p.spec.score.components() if c != S.REWARD]
    return {f"{c}_mean": _column_mean(read_table(out.table("scored"), columns=[c])[c]) for c in columns}


def _column_mean(values) -> float:
    """The mean of a column's values (Arrow, never Python objects: a scored table can hold millions of rows)."""
    import pyarrow.compute as pc

    mean = pc.mean(values).as_py()
    return float("nan") if mean is None else mean


SCORE = Stage(
    name="score",
    help="score every completion with the reward model(s) or function(s)",
    run=run_score,
    sections=lambda spec: {"score": _score(spec)},
    inputs=lambda spec: ["generate"],
    reads=lambda spec: {"generate/completions": S.COMPLETION_COLUMNS},
    tables=("scored",),
    enabled=_generated,
    enabled_when="data.kind is prompts",
    demands=_score_demands,
    flows=("train", "bon"),
)


# -- pairs ------------------------------------------------------------------------------------


# Scored tables up to this many rows are paired in the driver (one process, no Ray Data start-up: the fastest
# for small jobs); larger ones on Ray Data, across the cluster, the driver holding only sums and a sample.
# The environment variable ALIGNLIB_PAIRS_DRIVER_MAX_ROWS moves the line (0: always Ray Data).
DRIVER_PAIRS_MAX_ROWS = 200_000


def _driver_pairs_max_rows() -> int:
    import os

    return int(os.environ.get("ALIGNLIB_PAIRS_DRIVER_MAX_ROWS", DRIVER_PAIRS_MAX_ROWS))


def run_pairs(p: Pipeline, out: StageWriter) -> dict[str, Any]:
    import pyarrow as pa

    from alignlib.pairs import build, import_pairs
    from alignlib.quality import data_quality, imported_completions, render_html

    spec = p.spec.pairs
    scored_rows = (p.store.manifest("score") or {}).get("tables", {}).get("scored", 0) if _generated(p.spec) else 0
    if scored_rows > _driver_pairs_max_rows():
        return _pairs_on_ray(p, out, scored_rows)
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
    _require_examples(p, len(pairs) if _training_table(p.spec) == "pairs" else len(sft), counts)
    write_table(pa.Table.from_pylist(pairs, schema=S.arrow_schema(S.PAIR_COLUMNS)), out.table("pairs"))
    write_table(pa.Table.from_pylist(sft, schema=S.arrow_schema(S.SFT_COLUMNS)), out.table("sft"))
    floor = min((r[S.REWARD] for r in completions if r.get(S.REWARD) is not None), default=None)
    rewards = [r[S.REWARD] for r in sft if r[S.REWARD] is not None]  # an imported pair may have none
    at_floor = sum(r <= floor for r in rewards) if floor is not None else 0
    sft_mean = sum(rewards) / len(rewards) if rewards else None
    return _finish_pairs(p, counts, quality, len(pairs), len(sft), at_floor, sft_mean, floor)


def _require_examples(p: Pipeline, needed: int, counts: dict[str, Any]) -> None:
    if not needed:
        hint = (
            "check the preference file (every pair identical, repeated or held out?)"
            if p.spec.data.kind == "preferences"
            else "lower pairs.min_margin, raise generate.num_samples, or add a weak model and gold_vs_weak"
        )
        raise StageInputError(
            f"pairs: no training examples survived for loss {p.spec.train.loss.name!r} (counts: {counts}); {hint}"
        )


def _finish_pairs(p: Pipeline, counts: dict[str, Any], quality: dict[str, Any], pairs: int, sft: int, at_floor: int,
                  sft_mean: float | None, floor: float | None) -> dict[str, Any]:  # fmt: skip
    prompts = round_prompts(p).num_rows if _fresh(p) else count_rows(p.table_path("prompts", "train"))
    warnings = degenerate(p.spec, pairs, sft, at_floor, sft_mean, prompts, floor)
    for line in warnings:
        log(f"pairs: warning: {line}")
    return {**counts, "quality": quality, "warnings": warnings}


def _pairs_on_ray(p: Pipeline, out: StageWriter, scored_rows: int) -> dict[str, Any]:
    """The pairs stage of a large scored table: on Ray Data (`alignlib.pairs_data`), never in the driver."""
    from alignlib.pairs_data import build_on_ray
    from alignlib.quality import render_html

    ensure_ray()
    log(f"pairs: {scored_rows:,} scored rows, paired on Ray Data (over {_driver_pairs_max_rows():,})")
    scored = str(p.table_path("score", "scored"))
    counts, quality = build_on_ray(scored, p.spec.pairs, p.spec.seed, scored_rows, str(out.table("pairs")),
                                   str(out.table("sft")))  # fmt: skip
    (out.path / "report.html").write_text(render_html(quality, f"alignlib {p.spec.name}: preference data"))
    n_pairs = sum(v for k, v in counts.items() if k.startswith("pairs_"))
    _require_examples(p, n_pairs if _training_table(p.spec) == "pairs" else counts["sft_rows"], counts)
    floors = [s["min"] for s in quality["reward_by_generator"].values() if s.get("count")]
    floor = min(floors, default=None)
    at_floor = 0
    if floor is not None and counts["sft_rows"]:  # one float column of one row per prompt, as Arrow
        import pyarrow.compute as pc

        rewards = read_table(out.table("sft"), columns=[S.REWARD])[S.REWARD]
        at_floor = pc.sum(pc.less_equal(rewards, floor)).as_py() or 0
    sft_mean = quality.pop("sft_mean_reward")
    return _finish_pairs(p, counts, quality, n_pairs, counts["sft_rows"], at_floor, sft_mean, floor)


def degenerate(spec: JobSpec, pairs: int, sft: int, at_floor: int, sft_mean: float | None, prompts: int,
               floor: float | None) -> list[str]:  # fmt: skip
    """What makes the training set the loss reads nearly useless, in words (empty when nothing does).

    SFT: most best-of-N rows are no better than the worst reward any completion got (every sample of
    the prompt failed alike; training on them teaches the failure). Pairs: fewer than one per 10 prompts.
    Takes counts (pairs, SFT rows, SFT rows at the floor) and the SFT set's mean reward, not the rows.
    """
    out = []
    if _training_table(spec) == "sft" and sft and floor is not None:
        if at_floor >= 0.9 * sft:
            mean = sft_mean
            out.append(
                f"{at_floor} of {sft} best-of-N rows (the SFT set, mean reward {mean:.3f}) have the lowest "
                f"reward any completion got ({floor:g}): best-of-N found nothing better to learn from; raise "
                "generate.num_samples or temperature, start from a stronger policy, or use gold_vs_weak pairs "
                "with a paired loss"
            )
    if _training_table(spec) == "pairs" and pairs < 0.1 * prompts:
        out.append(
            f"only {pairs} pairs from {prompts} prompts: most prompts' samples tied or fell below "
            "pairs.min_margin; lower pairs.min_margin, raise generate.num_samples, or add gold_vs_weak pairs"
        )
    return out


PAIRS = Stage(
    name="pairs",
    help="turn scores into preference pairs and a best-of-N set (or import a preference file's pairs)",
    run=run_pairs,
    # The loss is in too: it decides which of the two sets must not come out empty.
    sections=lambda spec: {
        "pairs": spec.pairs.model_dump(mode="json"),
        "seed": spec.seed,
        "training_table": _training_table(spec),
    },  # fmt: skip
    # An imported preference set skips generate and score.
    inputs=lambda spec: ["score"] if _generated(spec) else ["prompts"],
    reads=lambda spec: (
        {"score/scored": S.SCORED_COLUMNS}
        if _generated(spec)
        else {"prompts/preferences": S.PREFERENCE_COLUMNS, "prompts/train": [S.PROMPT_ID]}
    ),
    tables=("pairs", "sft"),
)


# -- ref_logps --------------------------------------------------------------------------------


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


def _ref_logps_demands(spec: JobSpec) -> list[Demand]:
    from alignlib.train.reference import reference_pool, reference_resources

    return [Demand("ref_logps", "train.backend", reference_pool(spec)[1], reference_resources(spec))]


REF_LOGPS = Stage(
    name="ref_logps",
    help="DPO/IPO: the starting policy's log-probs of every pair, computed once (train.precompute_reference)",
    run=run_ref_logps,
    sections=lambda spec: {"policy": _model(spec.policy), "train": _train_settings(spec)},
    inputs=lambda spec: ["pairs"],
    reads=lambda spec: {"pairs/pairs": S.PAIR_COLUMNS},
    tables=("pairs",),
    enabled=lambda spec: reference_source(spec) == "precomputed",
    enabled_when="train.precompute_reference is true",
    demands=_ref_logps_demands,
)


# -- train ------------------------------------------------------------------------------------


def _jsonable(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in (metrics or {}).items() if isinstance(v, (int, float, str, bool))}


def run_train(p: Pipeline, out: StageWriter) -> dict[str, Any]:
    import pyarrow as pa
    import ray

    from alignlib.train.launch import metrics_path, read_metrics, run_training

    ensure_ray()
    table, source = _training_table(p.spec), _training_source(p.spec)
    paths = [str(p.table_path(source, table))]
    if p.round is not None and p.spec.rounds.train_on == "accumulated":
        paths = [str(e.table_path(_training_source(e.spec), table)) for e in p.earlier] + paths
    # Read before the workers start: once they hold their CPUs, a read task could wait forever.
    dataset = ray.data.read_parquet(paths).materialize()
    n = dataset.count()
    backend = p.spec.train.backend
    rounds = f" (rounds 1-{p.round})" if len(paths) > 1 else ""
    log(f"train: {p.spec.train.loss.name} on {n} {table} rows{rounds}, backend {backend.name} x{backend.num_workers}")
    run_name = f"{p.spec.name}-{p.fingerprint('train')}"
    if p.force:  # resuming is for the same run after a crash; --force trains from the start
        from alignlib.train.launch import storage_path

        rmtree(storage_path(p.spec) / run_name)
    result = run_training(p.spec, dataset, n, run_name=run_name, log=log)
    if result.error is not None:
        raise RuntimeError(f"training failed: {result.error}") from result.error
    epochs, steps = read_metrics(metrics_path(p.spec, run_name))
    write_table(pa.Table.from_pylist(epochs), out.table("metrics"))
    if steps:
        write_table(pa.Table.from_pylist(steps), out.table("steps"))
    return {
        "checkpoint": result.checkpoint,
        "examples": n,
        "final_metrics": _jsonable(result.metrics),
    }


def _train_reads(spec: JobSpec) -> dict[str, list[str]]:
    table = _training_table(spec)
    needed = [S.PROMPT_ID, S.MESSAGES] + ([S.CHOSEN, S.REJECTED] if table == "pairs" else [S.COMPLETION])
    if reference_source(spec) == "precomputed":
        needed += [S.REF_CHOSEN_LOGPS, S.REF_REJECTED_LOGPS]
    return {f"{_training_source(spec)}/{table}": needed}


TRAIN = Stage(
    name="train",
    help="train the policy on the pairs (ORPO, DPO, IPO, SimPO) or the best-of-N set (SFT): one worker in one "
    "Ray actor, several with Ray Train",
    run=run_train,
    sections=lambda spec: {
        "policy": _model(spec.policy), "train": _train_settings(spec), "seed": spec.seed,
    },  # fmt: skip
    inputs=lambda spec: [_training_source(spec)],
    reads=_train_reads,
    tables=("metrics", "steps"),
    demands=lambda spec: [Demand("train", "train.backend", spec.train.backend.num_workers, _train_worker(spec))],
)


# -- export -----------------------------------------------------------------------------------


def run_export(p: Pipeline, out: StageWriter) -> dict[str, Any]:
    import ray

    from alignlib.export import export_model

    ensure_ray()
    checkpoint = location(p.store.manifest("train")["stats"]["checkpoint"])
    if not (checkpoint / "model").exists():
        raise StageInputError(f"export: the training checkpoint {checkpoint} is gone; rerun `alignlib train`")
    target = out.path / "model"
    task = ray.remote(num_cpus=1)(export_model)
    policy = p.spec.policy
    kind = ray.get(task.remote(str(checkpoint / "model"), str(target), policy.model, p.spec.export.merge_lora,
                               policy.trust_remote_code))  # fmt: skip
    return {"kind": kind, "source": str(checkpoint / "model"), "model": str(out.location / "model")}


EXPORT = Stage(
    name="export",
    help="write the trained model as a Hugging Face directory (LoRA merged, or kept as an adapter)",
    run=run_export,
    sections=lambda spec: {"export": spec.export.model_dump(mode="json")},
    inputs=lambda spec: ["train"],
    demands=lambda spec: [Demand("export", "export", 1, {"CPU": 1.0})],
)


# -- eval -------------------------------------------------------------------------------------


def _held_out_answers(p: Pipeline, out: StageWriter, models: list[tuple[str, Any]]) -> int:
    """Sample each (generator, model) on the held-out prompts, score the answers, write completions/<generator>.

    Every model gets the same per-row seeds (`seed_key="eval"`), so they are compared on identical draws.
    The last model's engine may also sample the next round's candidates (`sample_ahead`).
    """
    import ray

    from alignlib.generate import Part, sample_parts
    from alignlib.score import score

    ensure_ray()
    spec = p.spec
    sampling = _sampling(spec, eval_temperature(spec))
    with ordered_data():
        prompts = ray.data.read_parquet(str(p.table_path("prompts", "eval")))
        total = count_rows(p.table_path("prompts", "eval")) * spec.eval.num_samples
        for i, (generator, model) in enumerate(models):
            parts = [Part(prompts, generator, spec.eval.num_samples, sampling, spec.seed, "eval")]
            ahead = sample_ahead(p, model) if i == len(models) - 1 else None
            rows = total
            if ahead is not None:
                parts.append(ahead)
                rows += round_prompts(p.ahead).num_rows * ahead.num_samples
                log(f"{out.stage}: sampling the {generator} policy on held-out prompts, and with the same engine "
                    f"round {p.ahead.round}'s {ahead.num_samples} candidates per prompt")  # fmt: skip
            else:
                log(f"{out.stage}: sampling the {generator} policy on held-out prompts")
            with Progress(f"{out.stage} ({generator})", rows) as progress:
                completions = counted(sample_parts(parts, model, spec.generate), progress).materialize()
            held_out = completions.filter(lambda r, g=generator: r[S.GENERATOR] == g) if ahead else completions
            score(held_out, spec.score).write_parquet(str(out.table("completions") / generator))
            if ahead is not None:
                target = _ahead_dir(p.ahead) / S.GENERATOR_POLICY
                rmtree(target)
                completions.filter(lambda r: r[S.GENERATOR] == S.GENERATOR_POLICY).write_parquet(
                    str(target), min_rows_per_file=ROWS_PER_FILE
                )
                (target / DONE).write_text("")
                p.ahead.ahead_fresh = True  # made by this run: adopted even under --force
    return len(models) * _most(spec.generate.concurrency)  # engines started


def run_eval(p: Pipeline, out: StageWriter) -> dict[str, Any]:
    from alignlib.spec import ModelSpec

    spec = p.spec
    # The export keeps the policy's own code (if any), so it is trusted exactly as far as the policy is.
    trained = ModelSpec(model=str(p.store.path("export") / "model"), chat_template=spec.policy.chat_template,
                        dtype=spec.policy.dtype, trust_remote_code=spec.policy.trust_remote_code)  # fmt: skip
    columns = [S.PROMPT_ID, S.GENERATOR, S.REWARD]
    if p.round is None:
        started = _held_out_answers(p, out, [(S.GENERATOR_BASE, spec.policy), (S.GENERATOR_TRAINED, trained)])
        rows = read_table(out.table("completions"), columns=columns)
    else:  # the starting policy's answers were sampled once for every round (stage `baseline`)
        import pyarrow as pa

        started = _held_out_answers(p, out, [(S.GENERATOR_TRAINED, trained)])
        rows = pa.concat_tables([read_table(out.table("completions"), columns=columns),
                                 read_table(p.table_path("baseline", "completions"), columns=columns)])  # fmt: skip
    summary = summarize(rows)
    (out.path / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return {**summary, "engine_starts": started}


def run_baseline(p: Pipeline, out: StageWriter) -> dict[str, Any]:
    import pyarrow.compute as pc

    started = _held_out_answers(p, out, [(S.GENERATOR_BASE, p.spec.policy)])
    rewards = read_table(out.table("completions"), columns=[S.REWARD])[S.REWARD]
    mean = pc.mean(rewards).as_py() if len(rewards) else float("nan")
    return {"answers": len(rewards), "base_mean_reward": mean, "engine_starts": started}


def per_prompt_means(table, generator: str | None = None) -> dict[str, float]:
    """prompt id -> mean reward over its samples (of `generator` only, if given), aggregated in Arrow: one Python
    value per prompt, not per row."""
    import pyarrow.compute as pc

    if generator is not None:
        table = table.filter(pc.equal(table[S.GENERATOR], generator))
    means = table.group_by(S.PROMPT_ID).aggregate([(S.REWARD, "mean")])
    return dict(zip(means[S.PROMPT_ID].to_pylist(), means[f"{S.REWARD}_mean"].to_pylist(), strict=True))


def summarize(table) -> dict[str, Any]:
    """Mean reward of base and trained policy, and the trained policy's win rate over prompts, from an Arrow table
    with prompt_id, generator and reward.

    Per prompt, each policy's reward is its mean over samples; a win counts 1, a tie 0.5.
    """
    base, trained = (per_prompt_means(table, g) for g in (S.GENERATOR_BASE, S.GENERATOR_TRAINED))
    if base.keys() != trained.keys():
        only = sorted(base.keys() ^ trained.keys())
        raise StageOutputError(f"eval: base and trained policy answered different prompts (e.g. {only[0]})")
    wins = [1.0 if trained[k] > base[k] else 0.5 if trained[k] == base[k] else 0.0 for k in base]
    return {
        "prompts": len(base),
        "base_mean_reward": _mean(list(base.values())),
        "trained_mean_reward": _mean(list(trained.values())),
        "win_rate": _mean(wins),
    }


def _eval_sections(spec: JobSpec) -> dict[str, Any]:
    return {
        "policy": _model(spec.policy),
        "eval": spec.eval.model_dump(mode="json"),
        "sampling": spec.generate.model_dump(mode="json", include={"engine", "max_new_tokens", "temperature", "top_p"}),
        "score": _score(spec),
        "seed": spec.seed,
    }


def _rounds(spec: JobSpec) -> bool:
    return spec.rounds.count > 1


EVAL = Stage(
    name="eval",
    help="sample the trained policy (and, in a single pass, the starting one) on the held-out prompts and score them",
    run=run_eval,
    sections=_eval_sections,
    inputs=lambda spec: ["prompts", "export"] + (["baseline"] if _rounds(spec) else []),
    reads=lambda spec: {"prompts/eval": S.PROMPT_COLUMNS},
    tables=("completions",),
    enabled=lambda spec: spec.eval.enabled,
    enabled_when="eval.enabled is true",
    demands=lambda spec: _generate_demands(spec, "eval") + _score_demands(spec, "eval"),
)


BASELINE = Stage(
    name="baseline",
    help="rounds: sample the starting policy on the held-out prompts once per run, the yardstick of every round",
    run=run_baseline,
    sections=_eval_sections,
    inputs=lambda spec: ["prompts"],
    reads=lambda spec: {"prompts/eval": S.PROMPT_COLUMNS},
    tables=("completions",),
    enabled=lambda spec: spec.eval.enabled and _rounds(spec),
    enabled_when="eval.enabled is true and rounds.count > 1",
    demands=lambda spec: _generate_demands(spec, "baseline") + _score_demands(spec, "baseline"),
)


# -- select (the bon flow) ---------------------------------------------------------------------


def run_select(p: Pipeline, out: StageWriter) -> dict[str, Any]:
    from alignlib.bon import arrow_tables, select

    prompts = read_table(p.table_path("prompts", "train")).to_pylist()  # the data file's order
    scored = read_table(p.table_path("score", "scored")).to_pylist()
    best, candidates, counts = select(prompts, scored)
    best_table, candidate_table = arrow_tables(best, candidates)
    write_table(best_table, out.table("best"))
    write_table(candidate_table, out.table("candidates"))
    flagged = counts["all_truncated"] + counts["no_candidates"]
    if flagged:
        log(f"select: {flagged} prompt(s) flagged ({counts['all_truncated']} with every candidate cut at "
            f"generate.max_new_tokens, {counts['no_candidates']} with none); their rows say so in `flag`")  # fmt: skip
    return counts


SELECT = Stage(
    name="select",
    help="best-of-N: rank each prompt's scored samples and keep the best (alignlib bon)",
    run=run_select,
    sections=lambda spec: {"rule": "reward, stop before length, fewer tokens, lower sample_index"},
    inputs=lambda spec: ["prompts", "score"],
    reads=lambda spec: {"prompts/train": S.PROMPT_COLUMNS, "score/scored": S.SCORED_COLUMNS},
    tables=("best", "candidates"),
    enabled=_generated,
    enabled_when="data.kind is prompts",
    flows=("bon",),
)


STAGES: list[Stage] = [PROMPTS, GENERATE, SCORE, PAIRS, REF_LOGPS, TRAIN, EXPORT, EVAL, BASELINE, SELECT]
BY_NAME: dict[str, Stage] = {s.name: s for s in STAGES}
NAMES: list[str] = [s.name for s in STAGES]


def stage(name: str) -> Stage:
    return BY_NAME[name]


def enabled_stages(spec: JobSpec, flow: str = "train") -> list[str]:
    """This job's stages in `flow`, in the order they run."""
    return [s.name for s in STAGES if flow in s.flows and s.enabled(spec)]


def demands(spec: JobSpec, flow: str = "train") -> list[Demand]:
    """Every enabled stage's peak request to Ray, read from the same spec fields the stages pass to Ray
    (and, for a multi-round job, those of rounds 2+ where `rounds.later` changes them)."""
    found = [d for s in STAGES if flow in s.flows and s.enabled(spec) for d in s.demands(spec)]
    if flow == "train" and spec.rounds.count > 1 and spec.rounds.later:
        from alignlib.spec import later_spec

        later = later_spec(spec)
        found += [d for d in demands(later) if d not in found]
    return found
