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

from alignlib.pipeline import Pipeline
from alignlib.raydata import log
from alignlib.spec import JobSpec
from alignlib.stages import MODEL_STAGE, SHARED, stage
from alignlib.stages.eval import held_out
from alignlib.store import StageStore, location


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
    previous = StageStore(spec.output_dir, f"round-{k - 1}").path(MODEL_STAGE) / "model"
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
                if not previous.store.is_complete(MODEL_STAGE, previous.fingerprint(MODEL_STAGE)):
                    raise _incomplete(k - 1)
            out.append(self._round(k, out))
        return out

    def plan(self, upto: int | None = None) -> dict[str, list[str]]:
        """What a run would do now: "shared" and "round-K" -> the stages to do (a round after one that makes
        a new export redoes everything: it starts from that export)."""
        upto = upto or self.count
        plan = {"shared": self.shared.todo()}
        redo = False
        for k, p in enumerate(self.pipelines(upto, complete=False), start=1):
            plan[f"round-{k}"] = p.stages() if redo or self.force else p.todo()
            redo = redo or any(not stage(n).evaluates for n in plan[f"round-{k}"])  # a new model
        return plan

    def check(self) -> None:
        """Every check a single pass makes before starting (spec sources, remote code, Ray resources), once,
        for all rounds: round 2's models are round 1's exports, everything else is the same."""
        # A single pass of the same job, forced: as if every stage were still to do.
        every = Pipeline(
            self.spec.model_copy(update={"rounds": self.spec.rounds.model_copy(update={"count": 1})}), force=True
        )
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
        first = self._round(1, [])
        # The starting policy's held-out answers and round 1's candidates: one model, so one engine.
        assert self.shared.round is not None
        self.shared.round.ahead = first
        manifests["shared"] = self.shared.run()
        self.shared.round.ahead = None
        done: list[Pipeline] = []
        current: Pipeline | None = first
        for k in range(1, upto + 1):
            log(f"round {k}/{self.count}: " + ("starting from the policy" if k == 1 else _start(self.spec, k)))
            assert current is not None
            names = current.stages()
            if k == upto and until is not None:
                names = names[: names.index(until) + 1]
            nxt = None
            judging = [n for n in names if stage(n).evaluates]
            if k < upto and judging:
                # Round k's model is the next round's policy: its held-out answers and the next round's
                # candidates come from one engine (`alignlib.stages.ahead`).
                manifests[f"round-{k}"] = current.run([n for n in names if n not in judging])
                nxt = self._round(k + 1, [*done, current])
                assert current.round is not None
                current.round.ahead = nxt
                manifests[f"round-{k}"].update(current.run(judging))
                current.round.ahead = None
            else:
                manifests[f"round-{k}"] = current.run(names)
            done.append(current)
            current = nxt or (self._round(k + 1, done) if k < upto else None)
        means, start = start_figures(self.shared)
        figures = round_figures(done, means)
        write_outputs(self.spec, start, figures, done)
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

    return StageInputError(
        f"round {k} is not complete for this spec (its export is missing or was made from a "
        f"different spec); run `alignlib run JOB.yaml --round {k}` first"
    )


# -- figures ------------------------------------------------------------------------------------


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def win_rate(a: dict[str, float], b: dict[str, float]) -> float | None:
    """How often `a` beats `b` over their common prompts (a tie counts half)."""
    common = sorted(set(a) & set(b))
    if not common:
        return None
    return sum(1.0 if a[p] > b[p] else 0.5 if a[p] == b[p] else 0.0 for p in common) / len(common)


def start_figures(shared: Pipeline) -> tuple[dict[str, float], dict[str, Any]]:
    """The starting policy's held-out answers, read once: (prompt id -> mean reward, the start's row of
    rounds.json). Empty figures where the run has no `baseline` (eval off)."""
    from alignlib.stages.eval import BASELINE, BaselineResult

    manifests = {n: shared.store.manifest(n) for n in shared.stages()}
    seconds = round(sum((m or {}).get("seconds", 0.0) for m in manifests.values()), 1)
    manifest = manifests.get(BASELINE.name)
    if manifest is None:
        return {}, {"held_out_reward": None, "held_out_mean_tokens": None, "engine_starts": 0, "seconds": seconds}
    baseline = BaselineResult.from_stats(manifest.get("stats", {}))
    means, tokens = held_out(shared, BASELINE.name)
    return means, {
        "held_out_reward": baseline.base_mean_reward,
        "held_out_mean_tokens": tokens,
        "engine_starts": baseline.engine_starts,
        # the starting policy's held-out answers, and round 1's candidates sampled with the same engine
        "seconds": seconds,
    }


def round_figures(rounds: list[Pipeline], start: dict[str, float]) -> list[dict[str, Any]]:
    """One dict per finished round: each stage's own figures (`Stage.figures`: data, pairs, loss), the held-out
    figures (vs the start's per-prompt means `start` and the round before), engine starts and seconds. Read from
    the committed tables."""
    previous = start
    out = []
    for k, p in enumerate(rounds, start=1):
        figures: dict[str, Any] = {"round": k}
        manifests = {n: p.store.manifest(n) for n in p.stages()}
        for name, manifest in manifests.items():
            declared = stage(name)
            if manifest is None:
                continue
            if declared.figures is not None:
                figures.update(declared.figures(p, declared.result.from_stats(manifest.get("stats", {}))))
            if declared.evaluates:
                now, tokens = held_out(p, name)
                figures.update(
                    held_out_reward=_mean(list(now.values())),
                    win_rate_vs_start=win_rate(now, start),
                    win_rate_vs_previous=win_rate(now, previous),
                    held_out_mean_tokens=tokens,
                )
                previous = now
        figures["engine_starts"] = sum((m or {}).get("stats", {}).get("engine_starts", 0) for m in manifests.values())
        figures["seconds"] = round(sum((m or {}).get("seconds", 0.0) for m in manifests.values()), 1)
        out.append(figures)
    return out


def write_outputs(spec: JobSpec, start: dict[str, Any], figures: list[dict[str, Any]], rounds: list[Pipeline]) -> None:
    """Write rounds.json and report.html."""
    from alignlib.report import render_rounds
    from alignlib.stages.train import logged_steps

    root = location(spec.output_dir)
    (root / "rounds.json").write_text(json.dumps({"start": start, "rounds": figures}, indent=2) + "\n")
    steps = {}
    for k, p in enumerate(rounds, start=1):
        logged = logged_steps(p)
        if logged is not None:
            steps[k] = logged
    (root / "report.html").write_text(render_rounds(spec, start, figures, steps))
