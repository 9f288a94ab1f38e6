"""Object-store locations by URI (`s3://bucket/prefix`), told apart from local paths without importing pyarrow."""

from __future__ import annotations

# The schemes output_dir (and a model read from a run's output) may use; pyarrow resolves each.
REMOTE_SCHEMES = ("s3", "gs", "gcs")


def is_uri(value: str) -> bool:
    """Whether `value` names an object-store location, not a local path."""
    scheme, sep, _ = str(value).partition("://")
    return bool(sep) and scheme in REMOTE_SCHEMES


def shown(path: object) -> str:
    """A path as the user would type it: relative to the current directory when it is under it; a URI as it is."""
    from pathlib import Path

    if is_uri(str(path)):
        return str(path)
    local = Path(str(path))
    try:
        return str(local.relative_to(Path.cwd()))
    except ValueError:
        return str(local)
