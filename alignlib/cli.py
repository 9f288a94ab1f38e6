"""Command line: `alignlib run JOB.yaml [key=value ...]`, one stage at a time, validate, schema, demo.

alignlib run jobs/demo.yaml                 # prompts -> generate -> ... -> eval
alignlib run jobs/demo.yaml --until pairs   # stop after the preference data
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
        return cmd

    for cmd in (job_command("run", "run every stage (complete ones are skipped)"),):
        cmd.add_argument("--force", action="store_true", help="rerun stages even if their outputs are complete")
        cmd.add_argument("--until", choices=NAMES, metavar="STAGE", help="stop after this stage (e.g. pairs)")
    for stage in STAGES:
        job_command(stage.name, f"run only this stage: {stage.help}").add_argument("--force", action="store_true")
    job_command("validate", "check a job spec without running it")
    demo = commands.add_parser("demo", help=f"run the CPU demo job ({DEMO_SPEC})")
    demo.add_argument("overrides", nargs="*", metavar="key=value")
    demo.add_argument("--force", action="store_true")
    commands.add_parser("schema", help="print the job spec's JSON schema")
    export = job_command("export-pairs", "write the pairs as prompt/chosen/rejected chat JSONL (TRL, Axolotl)")
    export.add_argument("--out", required=True, help="JSONL file to write")
    from alignlib import k8s

    k8s.add_arguments(job_command("k8s", "print the KubeRay RayJob (+ ConfigMap, NetworkPolicy) that runs this job"))
    return parser


def _demo_spec() -> Path:
    for candidate in (Path(DEMO_SPEC), Path(__file__).resolve().parent.parent / DEMO_SPEC):
        if candidate.exists():
            return candidate
    raise SystemExit(f"alignlib demo: {DEMO_SPEC} not found; run it from the alignlib checkout")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from alignlib.redaction import redact
    from alignlib.spec import SpecError, json_schema, load_spec

    if args.command == "schema":
        print(json.dumps(json_schema(), indent=2))
        return 0
    if args.command == "k8s":
        from alignlib.k8s import command

        return command(args)
    spec_path = _demo_spec() if args.command == "demo" else Path(args.spec)
    try:
        spec = load_spec(spec_path, args.overrides)
    except SpecError as err:
        print(redact(str(err)), file=sys.stderr)
        return 2
    if args.command == "validate":
        print(f"{spec_path}: valid (job {spec.name!r}, output_dir {spec.output_dir})")
        return 0

    from alignlib.pipeline import Pipeline
    from alignlib.report import print_summary

    if args.command == "export-pairs":
        return _export_pairs(Pipeline(spec), Path(args.out))

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
        root = _root_cause(err)
        if not type(root).__module__.startswith("alignlib"):
            raise  # not a problem alignlib diagnosed: keep the whole traceback
        # First line only: Ray appends retry advice to errors raised inside Ray Data.
        print(redact(f"alignlib: error: {str(root).splitlines()[0]}"), file=sys.stderr)
        return 1
    print_summary(spec, manifests)
    return 0


def _root_cause(err: BaseException) -> BaseException:
    """The innermost error: Ray wraps errors raised in tasks and actors (RayTaskError.cause)."""
    seen = {id(err)}
    while True:
        inner = getattr(err, "cause", None) or err.__cause__
        if inner is None or id(inner) in seen:
            return err
        seen.add(id(inner))
        err = inner


def _export_pairs(pipeline, out: Path) -> int:
    from alignlib.schema import to_conversational
    from alignlib.store import read_table

    if not pipeline.store.is_complete("pairs", pipeline.fingerprint("pairs")):
        print(f"alignlib: error: no complete pairs for this spec under {pipeline.store.path('pairs')}; "
              "run `alignlib run JOB.yaml` first", file=sys.stderr)  # fmt: skip
        return 1
    rows = to_conversational(read_table(pipeline.store.path("pairs") / "pairs").to_pylist())
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    print(f"wrote {len(rows)} pairs to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
