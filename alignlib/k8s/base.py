"""`python -m alignlib.k8s.base [--check] [DIR]`: write k8s/base's copies of the manifests in alignlib/k8s/manifests/.

Those manifests (the RayCluster's pods, the RayJob's submitter, the NetworkPolicy) are defined once, inside the
package, because `alignlib k8s` renders from them wherever alignlib is installed. kustomize reads no file outside
the directory it builds, so k8s/base holds a copy of each, marked as generated; tests/unit/test_k8s.py fails while
a copy differs. Run it from the repository root after editing a manifest.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from alignlib.k8s.pods import manifest_text

MANIFESTS = ("networkpolicy.yaml", "raycluster.yaml", "rayjob.yaml")
COMMAND = "python -m alignlib.k8s.base"
DEFAULT_DIR = "k8s/base"


def generated(name: str) -> str:
    """The text of k8s/base/NAME: the package's manifest under a line saying where to edit it."""
    header = f"# Generated from alignlib/k8s/manifests/{name} by `{COMMAND}`:\n# edit that file, not this one.\n"
    return header + manifest_text(name)


def stale(directory: Path) -> list[str]:
    """The copies in `directory` that are missing or differ from the package's manifests."""
    return [n for n in MANIFESTS if not (directory / n).is_file() or (directory / n).read_text() != generated(n)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=COMMAND, description="Write k8s/base's copies of alignlib/k8s/manifests/.")
    parser.add_argument("directory", nargs="?", default=DEFAULT_DIR, help=f"the kustomize base (default {DEFAULT_DIR})")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a copy differs")
    args = parser.parse_args(argv)
    directory = Path(args.directory)
    if not directory.is_dir():
        print(f"{COMMAND}: {directory} is not a directory; run it from the repository root", file=sys.stderr)
        return 2
    names = stale(directory)
    if args.check:
        for name in names:
            print(f"{directory / name} differs from alignlib/k8s/manifests/{name}; run `{COMMAND}`", file=sys.stderr)
        return 1 if names else 0
    for name in names:
        (directory / name).write_text(generated(name))
        print(f"wrote {directory / name}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
