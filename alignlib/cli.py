"""Command line: `alignlib run JOB.yaml [key=value ...]`, one stage at a time, validate, schema, demo.

alignlib run jobs/demo.yaml                 # prompts -> generate -> ... -> eval
alignlib run jobs/demo.yaml --until pairs   # stop after the preference data
alignlib run job.yaml --round 2             # a multi-round job (`rounds.count`): rounds 1 and 2 only
alignlib score jobs/demo.yaml               # one stage (its inputs must exist)
alignlib validate jobs/demo.yaml            # every problem, with its field path
alignlib demo                               # = alignlib run jobs/demo.yaml
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from alignlib.stages import NAMES, STAGES

DEMO_SPEC = "jobs/demo.yaml"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="alignlib", description="Rejection sampling and preference optimisation on Ray."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def job_command(name: str, help_text: str) -> argparse.ArgumentParser:
        cmd = commands.add_parser(name, help=help_text)
        cmd.add_argument("spec", metavar="JOB.yaml")
        cmd.add_argument("overrides", nargs="*", metavar="key=value", help="override spec fields, e.g. train.epochs=2")
        cmd.add_argument("--verbose", action="store_true",
                         help="also show Ray's and vLLM's own logs and progress bars (quiet by default)")  # fmt: skip
        return cmd

    round_help = ("a multi-round job (rounds.count > 1): stop after round K (default: the last round; with "
                  "--until, round 1)")
    for cmd in (job_command("run", "run every stage (complete ones are skipped)"),):
        cmd.add_argument("--force", action="store_true", help="redo every stage, even complete ones")
        cmd.add_argument("--until", choices=NAMES, metavar="STAGE", help="stop after this stage (e.g. pairs)")
        cmd.add_argument("--round", type=int, metavar="K", help=round_help)
    for stage in STAGES:
        if "train" in stage.flows:
            cmd = job_command(stage.name, f"run only this stage: {stage.help}")
            cmd.add_argument("--force", action="store_true")
            cmd.add_argument("--round", type=int, metavar="K",
                             help="a multi-round job: the round whose stage to run (default 1)")  # fmt: skip
    bon = job_command("bon", "best-of-N answers for every prompt of the data: generate N, score, keep the best")
    bon.add_argument("--out", metavar="FILE", help="also write the best answers here (.jsonl or .parquet)")
    bon.add_argument("--force", action="store_true", help="redo every stage, even complete ones")
    served = job_command("serve", "serve best-of-N answers behind an OpenAI-compatible API (Ray Serve): n samples "
                         "per request, the reward picks the one returned")  # fmt: skip
    served.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine "
                        "only; 0.0.0.0 for every interface)")  # fmt: skip
    served.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    job_command("validate", "check a job spec without running it")
    demo = commands.add_parser("demo", help=f"run the CPU demo job ({DEMO_SPEC}) from any directory, into ./runs/demo")
    demo.add_argument("overrides", nargs="*", metavar="key=value")
    demo.add_argument("--force", action="store_true")
    demo.add_argument("--verbose", action="store_true", help="also show Ray's and vLLM's own logs")
    demo.add_argument("--until", choices=NAMES, metavar="STAGE", help="stop after this stage (e.g. pairs)")
    demo.add_argument("--round", type=int, metavar="K", help=round_help)
    commands.add_parser("schema", help="print the job spec's JSON schema")
    export = job_command("export-pairs", "write the pairs as prompt/chosen/rejected chat JSONL (TRL, Axolotl), "
                         "or with --table sft the best-of-N set as prompt/completion chat JSONL")  # fmt: skip
    export.add_argument("--out", required=True, help="JSONL file to write")
    export.add_argument("--round", type=int, metavar="K", help="a multi-round job: the round whose pairs (default 1)")
    export.add_argument("--table", choices=["pairs", "sft"], default="pairs",
                        help="pairs (preference pairs, default) or sft (the best answer per prompt, for "
                             "rejection-sampling fine-tuning)")  # fmt: skip
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
        import os

        # Python would complain again while flushing stdout at exit: point it at /dev/null first.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # what a shell reports for a command ended by SIGPIPE


def _main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if getattr(args, "verbose", False):
        import os

        os.environ["ALIGNLIB_VERBOSE"] = "1"  # read by alignlib.raydata.verbose, here and in engine actors
    from alignlib.redaction import redact
    from alignlib.spec import SpecError, json_schema, load_spec

    if args.command == "schema":
        print(json.dumps(json_schema(), indent=2))
        return 0
    if args.command == "k8s":
        from alignlib.k8s import command

        return command(args)
    spec_path = _demo_spec() if args.command == "demo" else Path(args.spec)
    overrides = list(args.overrides)
    if args.command == "demo":
        # The demo's data ships with alignlib: found from any directory; its output goes to ./runs/demo.
        overrides.insert(0, f"data.path={spec_path.parent / 'data' / 'addition.jsonl'}")
    try:
        spec = load_spec(spec_path, overrides)
    except SpecError as err:
        print(redact(str(err)), file=sys.stderr)
        return 2
    if args.command == "validate":
        from alignlib.sources import problems
        from alignlib.stages import enabled_stages

        found = problems(spec, enabled_stages(spec))
        if found:
            print(redact(str(SpecError(str(spec_path), found))), file=sys.stderr)
            return 2
        print(f"{spec_path}: valid (job {spec.name!r}, output_dir {spec.output_dir})")
        return 0

    from alignlib.pipeline import Pipeline
    from alignlib.report import print_summary

    if args.command == "export-pairs":
        if spec.rounds.count > 1:
            from alignlib.rounds import Rounds

            k = args.round or 1
            if not 1 <= k <= spec.rounds.count:
                print(f"alignlib: error: --round {k}: this job has rounds 1 to {spec.rounds.count}", file=sys.stderr)
                return 2
            return _export_pairs(Rounds(spec).pipelines(k, complete=False)[-1], Path(args.out), args.table)
        return _export_pairs(Pipeline(spec), Path(args.out), args.table)
    if args.command == "bon":
        return _bon(spec, args, redact)
    if args.command == "serve":
        return _serve(spec, args, redact)

    if spec.rounds.count > 1 or getattr(args, "round", None) is not None:
        return _rounds(spec, args, redact)
    pipeline = Pipeline(spec, force=args.force)
    only = None if args.command in ("run", "demo") else [args.command]
    if getattr(args, "until", None):
        stages = pipeline.stages()
        if args.until not in stages:
            print(f"alignlib: error: --until {args.until}: this job has no such stage ({', '.join(stages)})",
                  file=sys.stderr)  # fmt: skip
            return 2
        only = stages[: stages.index(args.until) + 1]
    try:
        manifests = pipeline.run(only)
    except Exception as err:
        return _failed(err, redact)
    print_summary(spec, manifests)
    return 0


def _rounds(spec, args, redact) -> int:
    """A multi-round job: every round (`run`, `demo`), or one stage of one round (`alignlib pairs --round 2`)."""
    from alignlib.report import print_rounds, print_summary
    from alignlib.rounds import Rounds
    from alignlib.stages import enabled_stages

    count, k = spec.rounds.count, args.round
    if k is not None and not 1 <= k <= count:
        print(f"alignlib: error: --round {k}: this job has rounds 1 to {count} (rounds.count)", file=sys.stderr)
        return 2
    until = getattr(args, "until", None)
    if until is not None and until not in enabled_stages(spec):
        print(f"alignlib: error: --until {until}: this job has no such stage ({', '.join(enabled_stages(spec))})",
              file=sys.stderr)  # fmt: skip
        return 2
    rounds = Rounds(spec, force=args.force)
    try:
        if args.command not in ("run", "demo"):
            print_summary(spec, rounds.run_stage(args.command, k))
            return 0
        shared = rounds.shared.stages()
        if until in shared:  # stop before the first round
            print_summary(spec, rounds.shared.run(shared[: shared.index(until) + 1]))
            return 0
        result = rounds.run(k or (1 if until else count), until)
    except Exception as err:
        return _failed(err, redact)
    print_rounds(spec, result["start"], result["figures"])
    return 0


def _bon(spec, args, redact) -> int:
    """`alignlib bon`: the bon flow (prompts -> generate -> score -> select) under <output_dir>/bon."""
    from alignlib.bon import bon_spec, write_out
    from alignlib.pipeline import Pipeline
    from alignlib.report import print_summary
    from alignlib.store import read_table

    out = Path(args.out) if args.out else None
    if out is not None and (out.suffix not in (".jsonl", ".parquet") or not out.parent.is_dir()):
        print(f"alignlib: error: --out {out}: give a .jsonl or .parquet file in an existing directory",
              file=sys.stderr)  # fmt: skip
        return 2
    pipeline = Pipeline(bon_spec(spec), force=args.force, flow="bon")
    try:
        manifests = pipeline.run()
    except Exception as err:
        return _failed(err, redact)
    print_summary(pipeline.spec, manifests)
    if out is not None:
        write_out(read_table(pipeline.table_path("select", "best")), out)
        print(f"wrote {manifests['select']['tables']['best']} best answers to {out}")
    return 0


def _serve(spec, args, redact) -> int:
    """`alignlib serve`: checks what it can before starting anything, then serves until stopped."""
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
        return _failed(err, redact)


def _failed(err: Exception, redact) -> int:
    """Print an error a run stopped on and return its exit code: 2 for a spec whose sources are missing or
    wrong (nothing ran), 1 for a problem alignlib diagnosed; anything else is re-raised with its traceback."""
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


def _export_pairs(pipeline, out: Path, table: str) -> int:
    from alignlib.schema import to_conversational, to_sft_conversational
    from alignlib.store import read_table

    if not out.parent.is_dir():
        print(f"alignlib: error: --out {out}: directory {out.parent} does not exist", file=sys.stderr)
        return 2
    if not pipeline.store.is_complete("pairs", pipeline.fingerprint("pairs")):
        print(f"alignlib: error: no complete pairs for this spec under {pipeline.store.path('pairs')}; "
              "run `alignlib run JOB.yaml --until pairs` first", file=sys.stderr)  # fmt: skip
        return 1
    rows = read_table(pipeline.store.path("pairs") / table).to_pylist()
    records = to_conversational(rows) if table == "pairs" else to_sft_conversational(rows)
    try:
        out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    except OSError as err:
        print(f"alignlib: error: --out {out}: {err.strerror}", file=sys.stderr)
        return 2
    what = "pairs" if table == "pairs" else "best-of-N rows (the SFT set)"
    print(f"wrote {len(records)} {what} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
