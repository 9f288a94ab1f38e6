"""Command line: `alignlib run JOB.yaml [key=value ...]`, one stage at a time, validate, schema, demo.

alignlib run jobs/demo.yaml                 # prompts -> generate -> ... -> eval
alignlib run jobs/demo.yaml --until pairs   # stop after the preference data
alignlib run job.yaml --round 2             # a multi-round job (`rounds.count`): rounds 1 and 2 only
alignlib score jobs/demo.yaml               # one stage (its inputs must exist)
alignlib validate jobs/demo.yaml            # every problem, with its field path
alignlib demo                               # = alignlib run jobs/demo.yaml

Each command is one function, `COMMANDS` maps its name to it; the rules of `--round` and `--until` are in
`_round_and_until`. Heavy modules (Ray, vLLM, torch) are imported inside the functions that need them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from alignlib.stages import NAMES, STAGES

if TYPE_CHECKING:
    from alignlib.spec import JobSpec

DEMO_SPEC = "jobs/demo.yaml"
STAGE_COMMANDS = [stage.name for stage in STAGES if "train" in stage.flows]  # `alignlib <stage>`: one stage

Command = Callable[[argparse.Namespace], int]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="alignlib", description="Rejection sampling and preference optimisation on Ray."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    verbose_help = "also show Ray's and vLLM's own logs and progress bars (quiet by default)"
    force_help = "redo every stage, even complete ones"
    until_help = "stop after this stage (e.g. pairs)"
    round_help = (
        "a multi-round job (rounds.count > 1): stop after round K (default: the last round; with --until, round 1)"
    )
    stage_round_help = "a multi-round job: the round whose stage to run (default 1)"

    def job_command(name: str, help_text: str) -> argparse.ArgumentParser:
        cmd = commands.add_parser(name, help=help_text)
        cmd.add_argument("spec", metavar="JOB.yaml")
        cmd.add_argument("overrides", nargs="*", metavar="key=value", help="override spec fields, e.g. train.epochs=2")
        cmd.add_argument("--verbose", action="store_true", help=verbose_help)
        return cmd

    run = job_command("run", "run every stage (complete ones are skipped)")
    run.add_argument("--force", action="store_true", help=force_help)
    run.add_argument("--until", choices=NAMES, metavar="STAGE", help=until_help)
    run.add_argument("--round", type=int, metavar="K", help=round_help)
    for stage in STAGES:
        if stage.name in STAGE_COMMANDS:
            cmd = job_command(stage.name, f"run only this stage: {stage.help}")
            cmd.add_argument("--force", action="store_true")
            cmd.add_argument("--round", type=int, metavar="K", help=stage_round_help)
    bon = job_command("bon", "best-of-N answers for every prompt of the data: generate N, score, keep the best")
    bon.add_argument("--out", metavar="FILE", help="also write the best answers here (.jsonl or .parquet)")
    bon.add_argument("--force", action="store_true", help=force_help)
    served = job_command(
        "serve",
        "serve best-of-N answers behind an OpenAI-compatible API (Ray Serve): n samples per request, the reward picks "
        "the one returned",
    )
    host_help = "address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 for every interface)"
    served.add_argument("--host", default="127.0.0.1", help=host_help)
    served.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    job_command("validate", "check a job spec without running it")
    demo = commands.add_parser("demo", help=f"run the CPU demo job ({DEMO_SPEC}) from any directory, into ./runs/demo")
    demo.add_argument("overrides", nargs="*", metavar="key=value")
    demo.add_argument("--force", action="store_true")
    demo.add_argument("--verbose", action="store_true", help="also show Ray's and vLLM's own logs")
    demo.add_argument("--until", choices=NAMES, metavar="STAGE", help=until_help)
    demo.add_argument("--round", type=int, metavar="K", help=round_help)
    commands.add_parser("schema", help="print the job spec's JSON schema")
    export = job_command(
        "export-pairs",
        "write the pairs as prompt/chosen/rejected chat JSONL (TRL, Axolotl), or with --table sft the best-of-N set "
        "as prompt/completion chat JSONL",
    )
    export.add_argument("--out", required=True, help="JSONL file to write")
    export.add_argument("--round", type=int, metavar="K", help="a multi-round job: the round whose pairs (default 1)")
    export.add_argument(
        "--table",
        choices=["pairs", "sft"],
        default="pairs",
        help="pairs (preference pairs, default) or sft (the best answer per prompt, for rejection-sampling fine-tuning)",
    )
    from alignlib import k8s

    k8s.add_arguments(job_command("k8s", "print the KubeRay RayJob (+ ConfigMap, NetworkPolicy) that runs this job"))
    return parser


def _demo_spec() -> Path:
    candidate = Path(__file__).resolve().parent.parent / DEMO_SPEC
    if not candidate.exists():
        raise SystemExit(f"alignlib demo: {candidate} not found; the demo runs from an alignlib checkout")
    return candidate


def _parse(argv: list[str] | None) -> argparse.Namespace:
    """Options and `key=value` overrides in any order (`run JOB.yaml --until pairs train.epochs=1`)."""
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    unknown = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv: list[str] | None = None) -> int:
    """The `alignlib` command; output cut short by a closed pipe (`alignlib schema | head`) ends it quietly."""
    try:
        return _main(argv)
    except BrokenPipeError:
        # Python would complain again while flushing stdout at exit: point it at /dev/null first.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # what a shell reports for a command ended by SIGPIPE


def _main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if getattr(args, "verbose", False):
        os.environ["ALIGNLIB_VERBOSE"] = "1"  # read by alignlib.raydata.verbose, here and in engine actors
    try:
        return COMMANDS[args.command](args)
    except UsageError as err:
        print(f"alignlib: error: {err}", file=sys.stderr)
        return 2


class UsageError(Exception):
    """A command line that cannot run on this job (a round it does not have, an --out it cannot write): exit 2."""


def _job(command: Callable[[JobSpec, argparse.Namespace], int]) -> Command:
    """A command on a job spec: `command(spec, args)` gets JOB.yaml loaded with its overrides; a spec error is
    printed and exits 2 before the command starts."""

    def on_spec(args: argparse.Namespace) -> int:
        from alignlib.redaction import redact
        from alignlib.spec import SpecError, load_spec

        try:
            spec = load_spec(Path(args.spec), list(args.overrides))
        except SpecError as err:
            print(redact(str(err)), file=sys.stderr)
            return 2
        return command(spec, args)

    on_spec.__doc__ = command.__doc__
    return on_spec


def _round_and_until(spec: JobSpec, args: argparse.Namespace) -> tuple[int | None, str | None]:
    """`--round K` and `--until STAGE` as given (None where not): K must be a round of the job, STAGE a stage it
    has, else a UsageError."""
    from alignlib.stages import enabled_stages

    k, until = getattr(args, "round", None), getattr(args, "until", None)
    _check_round(spec, k)
    if until is not None and until not in (stages := enabled_stages(spec)):
        raise UsageError(f"--until {until}: this job has no such stage ({', '.join(stages)})")
    return k, until


def _check_round(spec: JobSpec, k: int | None, field: str = " (rounds.count)") -> None:
    """--round K names one of the job's rounds, 1 to rounds.count (export-pairs' message has never named the field)."""
    if k is not None and not 1 <= k <= spec.rounds.count:
        raise UsageError(f"--round {k}: this job has rounds 1 to {spec.rounds.count}{field}")


def _in_rounds(spec: JobSpec, k: int | None) -> bool:
    """Whether a run or a stage command goes through `Rounds`: a multi-round job, or any job given --round."""
    return spec.rounds.count > 1 or k is not None


def _schema(args: argparse.Namespace) -> int:
    """`alignlib schema`: the job spec's JSON schema."""
    from alignlib.spec import json_schema

    print(json.dumps(json_schema(), indent=2))
    return 0


def _k8s(args: argparse.Namespace) -> int:
    """`alignlib k8s`: the KubeRay manifests that run this job (alignlib.k8s loads the spec itself)."""
    from alignlib.k8s import command

    return command(args)


@_job
def _validate(spec: JobSpec, args: argparse.Namespace) -> int:
    """`alignlib validate`: every problem of the spec and its sources, nothing run."""
    from alignlib.redaction import redact
    from alignlib.sources import problems
    from alignlib.spec import SpecError
    from alignlib.stages import enabled_stages

    spec_path = Path(args.spec)
    found = problems(spec, enabled_stages(spec))
    if found:
        print(redact(str(SpecError(str(spec_path), found))), file=sys.stderr)
        return 2
    try:  # what `run` checks before its first stage: models' own code, and what the stages ask Ray for
        if spec.rounds.count > 1:
            from alignlib.rounds import Rounds

            Rounds(spec, force=True).check()
        else:
            from alignlib.pipeline import Pipeline

            every = Pipeline(spec, force=True)
            every.check_remote_code()
            every.check_resources(every.stages())
    except Exception as err:
        return _failed(err)
    print(f"{spec_path}: valid (job {spec.name!r}, output_dir {spec.output_dir})")
    return 0


def _demo(args: argparse.Namespace) -> int:
    """`alignlib demo`: `alignlib run` on the demo job from any directory (its data ships with alignlib)."""
    spec = _demo_spec()
    data = f"data.path={spec.parent / 'data' / 'addition.jsonl'}"
    return _run(argparse.Namespace(**{**vars(args), "spec": str(spec), "overrides": [data, *args.overrides]}))


@_job
def _run(spec: JobSpec, args: argparse.Namespace) -> int:
    """`alignlib run`: every stage, or those up to --until; a multi-round job through `Rounds`."""
    from alignlib.pipeline import Pipeline

    k, until = _round_and_until(spec, args)
    if _in_rounds(spec, k):
        return _run_rounds(spec, args.force, k, until)
    pipeline = Pipeline(spec, force=args.force)
    stages = pipeline.stages()
    return _summarised(spec, lambda: pipeline.run(stages[: stages.index(until) + 1] if until else None))


def _run_rounds(spec: JobSpec, force: bool, k: int | None, until: str | None) -> int:
    """Every round up to K (default: the last; with --until, round 1), or only the shared stages up to --until."""
    from alignlib.report import print_rounds, print_summary
    from alignlib.rounds import Rounds

    rounds = Rounds(spec, force=force)
    try:
        shared = rounds.shared.stages()
        if until in shared:  # stop before the first round
            print_summary(spec, rounds.shared.run(shared[: shared.index(until) + 1]))
            return 0
        result = rounds.run(k or (1 if until else spec.rounds.count), until)
    except Exception as err:
        return _failed(err)
    print_rounds(spec, result["start"], result["figures"])
    return 0


@_job
def _stage(spec: JobSpec, args: argparse.Namespace) -> int:
    """`alignlib <stage>`: that stage only (of round K, default 1, in a multi-round job); its inputs must exist."""
    from alignlib.pipeline import Pipeline
    from alignlib.rounds import Rounds

    k, _ = _round_and_until(spec, args)
    if _in_rounds(spec, k):
        rounds = Rounds(spec, force=args.force)
        return _summarised(spec, lambda: rounds.run_stage(args.command, k))
    pipeline = Pipeline(spec, force=args.force)
    return _summarised(spec, lambda: pipeline.run([args.command]))


@_job
def _bon(spec: JobSpec, args: argparse.Namespace) -> int:
    """`alignlib bon`: the bon flow (prompts -> generate -> score -> select) under <output_dir>/bon."""
    from alignlib.bon import bon_spec, write_out
    from alignlib.pipeline import Pipeline
    from alignlib.report import print_summary
    from alignlib.store import read_table

    out = Path(args.out) if args.out else None
    if out is not None and (out.suffix not in (".jsonl", ".parquet") or not out.parent.is_dir()):
        raise UsageError(f"--out {out}: give a .jsonl or .parquet file in an existing directory")
    pipeline = Pipeline(bon_spec(spec), force=args.force, flow="bon")
    try:
        manifests = pipeline.run()
    except Exception as err:
        return _failed(err)
    print_summary(pipeline.spec, manifests)
    if out is not None:
        write_out(read_table(pipeline.table_path("select", "best")), out)
        print(f"wrote {manifests['select']['tables']['best']} best answers to {out}")
    return 0


@_job
def _serve(spec: JobSpec, args: argparse.Namespace) -> int:
    """`alignlib serve`: checks what it can before starting anything, then serves until stopped."""
    from alignlib.redaction import redact
    from alignlib.serving import preflight, serve_forever
    from alignlib.spec import SpecError

    found = preflight(spec)
    if not 0 < args.port < 65536:
        found.append(f"--port: {args.port} is not a TCP port (1-65535)")
    if found:
        print(redact(str(SpecError(str(args.spec), found))), file=sys.stderr)
        return 2
    try:
        return serve_forever(spec, args.host, args.port)
    except Exception as err:
        return _failed(err)


@_job
def _export(spec: JobSpec, args: argparse.Namespace) -> int:
    """`alignlib export-pairs`: round K's pairs (default 1) of a multi-round job; a single-round job's own."""
    from alignlib.pipeline import Pipeline
    from alignlib.rounds import Rounds

    if spec.rounds.count == 1:
        return _export_pairs(Pipeline(spec), Path(args.out), args.table)
    k = args.round or 1
    _check_round(spec, k, field="")
    return _export_pairs(Rounds(spec).pipelines(k, complete=False)[-1], Path(args.out), args.table)


COMMANDS: dict[str, Command] = {
    "run": _run,
    **dict.fromkeys(STAGE_COMMANDS, _stage),
    "bon": _bon,
    "serve": _serve,
    "validate": _validate,
    "demo": _demo,
    "schema": _schema,
    "export-pairs": _export,
    "k8s": _k8s,
}


def _summarised(spec: JobSpec, run: Callable[[], dict[str, Any]]) -> int:
    """`run()` the stages, then print the summary of their manifests; a failure is reported as `_failed` says."""
    from alignlib.report import print_summary

    try:
        manifests = run()
    except Exception as err:
        return _failed(err)
    print_summary(spec, manifests)
    return 0


def _failed(err: Exception) -> int:
    """Print an error a run stopped on and return its exit code: 2 for a spec whose sources are missing or
    wrong (nothing ran), 1 for a problem alignlib diagnosed; anything else is re-raised with its traceback."""
    from alignlib.redaction import redact
    from alignlib.spec import SpecError

    if isinstance(err, SpecError):
        print(redact(str(err)), file=sys.stderr)
        return 2
    root = _root_cause(err)
    if not type(root).__module__.startswith("alignlib"):
        raise err  # not a problem alignlib diagnosed: keep the whole traceback
    # First line only: Ray appends retry advice to errors raised inside Ray Data.
    print(redact(f"alignlib: error: {str(root).splitlines()[0]}"), file=sys.stderr)
    return 1


def _root_cause(err: BaseException) -> BaseException:
    """The innermost error: Ray wraps errors raised in tasks and actors (RayTaskError.cause)."""
    seen = {id(err)}
    while True:
        inner = getattr(err, "cause", None) or err.__cause__
        if inner is None or id(inner) in seen:
            return err
        seen.add(id(inner))
        err = inner


def _export_pairs(pipeline: Any, out: Path, table: str) -> int:
    from alignlib.schema import to_conversational, to_sft_conversational
    from alignlib.store import read_table

    if not out.parent.is_dir():
        raise UsageError(f"--out {out}: directory {out.parent} does not exist")
    if not pipeline.store.is_complete("pairs", pipeline.fingerprint("pairs")):
        print(
            f"alignlib: error: no complete pairs for this spec under {pipeline.store.path('pairs')}; "
            "run `alignlib run JOB.yaml --until pairs` first",
            file=sys.stderr,
        )
        return 1
    rows = read_table(pipeline.store.path("pairs") / table).to_pylist()
    records = to_conversational(rows) if table == "pairs" else to_sft_conversational(rows)
    try:
        out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    except OSError as err:
        raise UsageError(f"--out {out}: {err.strerror}") from err
    what = "pairs" if table == "pairs" else "best-of-N rows (the SFT set)"
    print(f"wrote {len(records)} {what} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
