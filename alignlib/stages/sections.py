"""What several stages share: the spec sections hashed into fingerprints, what they ask Ray for, and which
training prompts a round samples."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from alignlib import schema as S
from alignlib.sources import model_digest, reward_digests
from alignlib.spec import LOSSES_NEEDING_PAIRS, JobSpec, most, reference_source
from alignlib.stages.contract import Demand, StageContext
from alignlib.store import read_table

if TYPE_CHECKING:
    import pyarrow as pa
    import ray.data

    from alignlib.generate import Sampling
    from alignlib.spec import ModelSpec

# -- fingerprint sections ---------------------------------------------------------------------------


def model_section(model: ModelSpec) -> dict[str, Any]:
    """A model spec in a fingerprint: its settings, and the model itself by content (`sources.model_digest`)."""
    return {**model.model_dump(mode="json"), "model": model_digest(model.model)}


def score_section(spec: JobSpec) -> dict[str, Any]:
    """The score section in a fingerprint: its settings, and each reward by content (model files, function source)."""
    return {**spec.score.model_dump(mode="json"), "contents": reward_digests(spec)}


def train_section(spec: JobSpec) -> dict[str, Any]:
    """The train section in a fingerprint; a reference model other than the policy, by content."""
    settings = spec.train.model_dump(mode="json")
    if spec.train.reference_model is not None:
        settings["reference_model"] = model_digest(spec.train.reference_model)
    return settings


def generated(spec: JobSpec) -> bool:
    """The job samples its own answers (data.kind prompts), rather than importing a preference set."""
    return spec.data.kind == "prompts"


def training_table(spec: JobSpec) -> str:
    """The table of the pairs stage the loss trains on: `pairs` for a paired loss, `sft` for SFT."""
    return "pairs" if LOSSES_NEEDING_PAIRS[spec.train.loss.name] else "sft"


def training_source(spec: JobSpec) -> str:
    """The stage whose copy of that table training reads (`ref_logps` adds the reference log-probs)."""
    return "ref_logps" if reference_source(spec) == "precomputed" else "pairs"


# -- what stages ask Ray for ------------------------------------------------------------------------


def _parallel(engine_kwargs: dict[str, Any]) -> int:
    """vLLM replicas reserve one placement-group bundle per tensor/pipeline-parallel worker."""
    return int(engine_kwargs.get("tensor_parallel_size", 1)) * int(engine_kwargs.get("pipeline_parallel_size", 1))


def generate_demands(spec: JobSpec, stage: str = "generate") -> list[Demand]:
    g = spec.generate
    if g.engine == "vllm":
        engine = {k: v * _parallel(g.engine_kwargs) for k, v in g.resources.items()}
    else:
        engine = {"CPU": 1.0, **g.resources}  # Ray Data's default for an actor without num_cpus
    return [Demand(stage, "generate.resources", most(g.concurrency), engine)]


def score_demands(spec: JobSpec, stage: str = "score") -> list[Demand]:
    out = []
    for i, (_, reward, _) in enumerate(spec.score.components()):
        where = f"score.rewards[{i}]" if spec.score.rewards else "score.reward"
        if reward.type == "model":
            if reward.engine == "vllm":
                per_actor = {k: v * _parallel(reward.engine_kwargs) for k, v in reward.resources.items()}
            else:
                per_actor = {"CPU": 1.0, **reward.resources}
            out.append(Demand(stage, f"{where}.resources", most(reward.concurrency), per_actor))
        else:
            out.append(Demand(stage, where, 1, {"CPU": 0.5}))
    return out


# -- the prompts a round samples ------------------------------------------------------------------


def fresh(ctx: StageContext) -> bool:
    """This round samples its own slice of the training prompts (`rounds.prompts: fresh`)."""
    return ctx.round is not None and ctx.round.number > 0 and ctx.spec.rounds.prompts == "fresh"


def round_prompts(ctx: StageContext) -> pa.Table:
    """The training prompts this pass samples, as an Arrow table of prompt_id and gold: all of them, or its round's
    fresh slice."""
    import pyarrow as pa

    from alignlib.prompts import round_of

    table = read_table(ctx.table_path("prompts", "train"), columns=[S.PROMPT_ID, S.GOLD])
    if ctx.round is not None and fresh(ctx):
        seed, count, k = ctx.spec.seed, ctx.spec.rounds.count, ctx.round.number
        table = table.filter(pa.array([round_of(i, seed, count) == k for i in table[S.PROMPT_ID].to_pylist()]))
    return table


def round_dataset(ctx: StageContext) -> ray.data.Dataset:
    """The training prompts this pass samples, as a Ray Dataset (`round_prompts`)."""
    import ray

    prompts = ray.data.read_parquet(str(ctx.table_path("prompts", "train")))
    if ctx.round is not None and fresh(ctx):
        from alignlib.prompts import in_round
        from alignlib.raydata import LIGHT_CPUS

        prompts = prompts.map_batches(
            in_round,  # type: ignore[arg-type]  # Ray's stub types the batch function without fn_args
            fn_args=(ctx.spec.seed, ctx.round.number, ctx.spec.rounds.count),
            batch_format="pyarrow",
            num_cpus=LIGHT_CPUS,
        )
    return prompts


def seed_key(ctx: StageContext, generator: str) -> str:
    """Round K > 1 draws new seeds for the policy; the weak model's draws stay those of round 1."""
    k = ctx.round.number if ctx.round is not None else 0
    if k <= 1 or generator == S.GENERATOR_WEAK:
        return generator
    return f"{generator}@round-{k}"


def sampling(spec: JobSpec, temperature: float | None = None) -> Sampling:
    from alignlib.generate import Sampling

    g = spec.generate
    return Sampling(g.max_new_tokens, g.temperature if temperature is None else temperature, g.top_p)
