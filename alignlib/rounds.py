"""Iterative rounds: the model trained in round K samples round K+1's candidates, from one spec (`rounds`).

    <output_dir>/prompts/     the train / held-out split, once per run
    <output_dir>/baseline/    the starting policy's held-out answers, scored, once per run
    <output_dir>/round-K/     generate, score, pairs, [ref_logps], train, export, eval of round K
    <output_dir>/rounds.json  the per-round figures (`round_figures`), rewritten at the end of every run
    <output_dir>/report.html  the same as curves across rounds, one page, no scripts

Round K's spec is the job's with the policy replaced by round K-1's export (`rounds.start_from:
previous`) and the DPO/IPO reference set by `rounds.reference`; its fingerprints chain round K-1's
export fingerprint (`Pipeline._round_key`) and the export's files (`sources.model_digest`), so a
changed round-1 setting redoes every later round, and a killed run resumes in the round and stage
where it stopped. A job with `rounds.count: 1` is a single pass laid out exactly as without rounds.
"""

from __future__ import annotations

import json
from typing import Any

from alignlib import schema as S
from alignlib.pipeline import Pipeline
from alignlib.raydata import log
from alignlib.spec import JobSpec
from alignlib.stages import SHARED, per_prompt_means
from alignlib.store import StageStore, location, read_table


def round_spec(spec: JobSpec, k: int) -> JobSpec:
    """The spec round `k` runs: round 1 is the job as written; later rounds start from the previous export."""
    from alignlib.sources import absolute_paths
    from alignlib.spec import later_spec

    rounds = spec.rounds
    if k == 1:
        return spec
    later = absolute_paths(later_spec(spec)) if rounds.later else spec
    if rounds.start_from == "base":
        return later
    # In an object store the export sits in the attempt its manifest names: resolved once it is committed.
    previous = StageStore(spec.output_dir, f"round-{k - 1}").path("export") / "model"
    policy = later.policy.model_copy(update={"model": str(previous)})
    initial = spec.train.reference_model or spec.policy.model  # the first round's
    train = later.train.model_copy(update={"reference_model": initial if rounds.reference == "initial" else None})
    return later.model_copy(update={"policy": policy, "train": train})


class Rounds:
    """Runs a multi-round job: the shared stages, then each round's stages in order."""

    def __init__(self, spec: JobSpec, force: bool = False):
        self.spec, self.force = spec, force
        self.shared = Pipeline(spec, force, round=0)
        self.count = spec.rounds.count

    def pipelines(self, upto: int, complete: bool = True) -> list[Pipeline]:
        """The pipelines of rounds 1..upto; with `complete`, rounds before `upto` must be finished (their
        exports are the next round's policy)."""
        out: list[Pipeline] = []
        for k in range(1, upto + 1):
            if k > 1 and complete and self.spec.rounds.start_from == "previous":
                previous = out[-1]
                if not previous.store.is_complete("export", previous.fingerprint("export")):
                    raise _incomplete(k - 1)
            out.append(self._round(k, out))
        return out

    def plan(self, upto: int | None = None) -> dict[str, list[str]]:
        """What a run would do now: "shared" and "round-K" -> the stages to do (a round after one that makes
        a new export redoes everything: it starts from that export)."""
        upto = upto or self.count
        plan = {"shared": self.shared.todo()}
        redo = False
        for p in self.pipelines(upto, complete=False):
            plan[f"round-{p.round}"] = p.stages() if redo or self.force else p.todo()
            redo = redo or any(n != "eval" for n in plan[f"round-{p.round}"])  # a new export
        return plan

    def check(self) -> None:
        """Every check a single pass makes before starting (spec sources, remote code, Ray resources), once,
        for all rounds: round 2's models are round 1's exports, everything else is the same."""
        # A single pass of the same job, forced: as if every stage were still to do.
        every = Pipeline(self.spec.model_copy(update={"rounds": self.spec.rounds.model_copy(update={"count": 1})}),
                         force=True)  # fmt: skip
        names = every.stages()
        every.check_remote_code()
        every.check_sources(names)
        every.check_resources(names)
        if self.spec.rounds.later:  # what rounds 2+ change is checked now too, not when round 2 starts
            from alignlib.spec import later_spec

            later = Pipeline(later_spec(every.spec), force=True)
            later.check_remote_code()
            later.check_sources(names)
            later.check_resources(later.stages())

    def run(self, upto: int | None = None, until: str | None = None) -> dict[str, Any]:
        """Rounds 1..upto (all by default), the last of them stopping after stage `until`."""
        upto = upto or self.count
        self.check()
        for where, names in self.plan(upto).items():
            log(f"{where}: " + (f"to do: {', '.join(names)}" if names else "complete"))
        manifests: dict[str, dict[str, Any]] = {}
        current = self._round(1, [])
        # The starting policy's held-out answers and round 1's candidates: one model, so one engine.
        self.shared.ahead = current
        manifests["shared"] = self.shared.run()
        done: list[Pipeline] = []
        for k in range(1, upto + 1):
            log(f"round {k}/{self.count}: " + ("starting from the policy" if k == 1 else _start(self.spec, k)))
            names = current.stages()
            if k == upto and until is not None:
                names = names[: names.index(until) + 1]
            nxt = None
            if k < upto and "eval" in names:
                # Round k's export is the next round's policy: its held-out answers and the next round's
                # candidates come from one engine (`stages.sample_ahead`).
                manifests[f"round-{k}"] = current.run([n for n in names if n != "eval"])
                nxt = current.ahead = self._round(k + 1, [*done, current])
                manifests[f"round-{k}"].update(current.run(["eval"]))
            else:
                manifests[f"round-{k}"] = current.run(names)
            done.append(current)
            current = nxt or (self._round(k + 1, done) if k < upto else None)
        figures = round_figures(self.spec, done, self.shared)
        start = write_outputs(self.spec, figures, done, self.shared)
        return {"manifests": manifests, "figures": figures, "start": start}

    def _round(self, k: int, earlier: list[Pipeline]) -> Pipeline:
        return Pipeline(round_spec(self.spec, k), self.force, round=k, shared=self.shared, earlier=list(earlier))

    def run_stage(self, name: str, k: int | None) -> dict[str, dict[str, Any]]:
        """One stage (`alignlib pairs JOB.yaml --round 2`): a shared one, or one of round `k` (default 1)."""
        if name in SHARED:
            return self.shared.run([name])
        pipeline = self.pipelines(k or 1)[-1]
        return pipeline.run([name])


def _start(spec: JobSpec, k: int) -> str:
    if spec.rounds.start_from == "base":
        return "starting again from the policy, on this round's data"
    return f"starting from round {k - 1}'s export"


def _incomplete(k: int) -> Exception:
    from alignlib.stages import StageInputError

    return StageInputError(f"round {k} is not complete for this spec (its export is missing or was made from a "
                           f"different spec); run `alignlib run JOB.yaml --round {k}` first")  # fmt: skip


# -- figures ------------------------------------------------------------------------------------


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def win_rate(a: dict[str, float], b: dict[str, float]) -> float | None:
    """How often `a` beats `b` over their common prompts (a tie counts half)."""
    common = sorted(set(a) & set(b))
    if not common:
        return None
    return sum(1.0 if a[p] > b[p] else 0.5 if a[p] == b[p] else 0.0 for p in common) / len(common)


DATA_COLUMNS = [S.PROMPT_ID, S.GENERATOR, S.REWARD, S.NUM_TOKENS]  # what the figures read of scored and held-out answers


def _tokens(answers, generator: str | None = None) -> float | None:
    """Mean answer length in tokens (of `generator` only, if given) over the answers that have one."""
    import pyarrow.compute as pc

    if generator is not None:
        answers = answers.filter(pc.equal(answers[S.GENERATOR], generator))
    return pc.mean(answers[S.NUM_TOKENS]).as_py()  # nulls (answers with no token count) are skipped; None if none


def data_figures(scored) -> dict[str, Any]:
    """From a round's own policy samples (an Arrow table with DATA_COLUMNS; Arrow compute, no Python object per
    row, so millions of rows stay cheap): reward mean and max, best-worst gap, tie share, length."""
    import pyarrow.compute as pc

    policy = scored.filter(pc.equal(scored[S.GENERATOR], S.GENERATOR_POLICY))
    spread = policy.group_by(S.PROMPT_ID).aggregate([(S.REWARD, "max"), (S.REWARD, "min")])
    gaps = pc.subtract(spread[f"{S.REWARD}_max"], spread[f"{S.REWARD}_min"])
    return {
        "sample_mean_reward": pc.mean(policy[S.REWARD]).as_py(),
        "sample_max_reward": pc.max(policy[S.REWARD]).as_py(),
        "best_worst_gap": pc.mean(gaps).as_py(),
        "tied_share": pc.mean(pc.cast(pc.equal(gaps, 0), "float64")).as_py(),
        "sample_mean_tokens": pc.mean(policy[S.NUM_TOKENS]).as_py(),
    }


def round_figures(spec: JobSpec, rounds: list[Pipeline], shared: Pipeline) -> list[dict[str, Any]]:
    """One dict per finished round: held-out figures (vs round 0 and the round before), data figures,
    pairs per strategy, best-of-N mean reward, final training loss, engine starts. Read from the tables."""
    out = []
    base_path = shared.table_path("baseline", "completions")
    previous = per_prompt_means(read_table(base_path, columns=DATA_COLUMNS)) if base_path.exists() else {}
    start = previous
    for p in rounds:
        figures: dict[str, Any] = {"round": p.round}
        manifests = {n: p.store.manifest(n) for n in p.stages()}
        if manifests.get("score"):
            figures.update(data_figures(read_table(p.table_path("score", "scored"), columns=DATA_COLUMNS)))
        if manifests.get("pairs"):
            stats = manifests["pairs"]["stats"]
            figures["pairs"] = {k.removeprefix("pairs_"): v for k, v in stats.items() if k.startswith("pairs_")}
            import pyarrow.compute as pc

            figures["best_of_n_mean_reward"] = pc.mean(read_table(p.table_path("pairs", "sft"), columns=[S.REWARD])[S.REWARD]).as_py()
        if manifests.get("train"):
            metrics = read_table(p.table_path("train", "metrics")).to_pylist()
            figures["final_train_loss"] = metrics[-1].get("train/loss") if metrics else None
        if manifests.get("eval"):
            answers = read_table(p.table_path("eval", "completions"), columns=DATA_COLUMNS)
            now = per_prompt_means(answers, S.GENERATOR_TRAINED)
            figures.update(
                held_out_reward=_mean(list(now.values())),
                win_rate_vs_start=win_rate(now, start),
                win_rate_vs_previous=win_rate(now, previous),
                held_out_mean_tokens=_tokens(answers, S.GENERATOR_TRAINED),
            )
            previous = now
        figures["engine_starts"] = sum((m or {}).get("stats", {}).get("engine_starts", 0) for m in manifests.values())
        figures["seconds"] = round(sum((m or {}).get("seconds", 0.0) for m in manifests.values()), 1)
        out.append(figures)
    return out


def write_outputs(spec: JobSpec, figures: list[dict[str, Any]], rounds: list[Pipeline], shared: Pipeline) -> dict:
    """Write rounds.json and report.html; returns the figures of the start (round 0)."""
    from alignlib.report import render_rounds

    root = location(spec.output_dir)
    baseline = shared.store.manifest("baseline") or {}
    base_path = shared.table_path("baseline", "completions")
    tokens = _tokens(read_table(base_path, columns=DATA_COLUMNS)) if base_path.exists() else None
    start = {"held_out_reward": baseline.get("stats", {}).get("base_mean_reward"),
             "held_out_mean_tokens": tokens,
             "engine_starts": baseline.get("stats", {}).get("engine_starts", 0),
             # the starting policy's held-out answers, and round 1's candidates sampled with the same engine
             "seconds": round(sum((shared.store.manifest(n) or {}).get("seconds", 0.0) for n in shared.stages()), 1)}
    (root / "rounds.json").write_text(json.dumps({"start": start, "rounds": figures}, indent=2) + "\n")
    steps = {}
    for p in rounds:
        path = p.table_path("train", "steps")
        if path.exists():
            steps[p.round] = read_table(path).to_pylist()
    (root / "report.html").write_text(render_rounds(spec, start, figures, steps))
    return start
