"""What a run prints at the end: where its outputs are, and the before/after numbers."""

from __future__ import annotations

from typing import Any

from alignlib.redaction import redact
from alignlib.store import StageStore


def _print(text: str) -> None:
    print(redact(text))  # paths and stats could carry a secret from the environment; never print one


def shown(path) -> str:
    """A path as the user would type it: relative to the current directory when it is under it."""
    from pathlib import Path

    path = Path(path)
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def print_summary(spec, manifests: dict[str, dict[str, Any]]) -> None:
    store = StageStore(spec.output_dir)
    _print(f"\n== alignlib job {spec.name!r}: outputs under {shown(store.root)}")
    for stage, manifest in manifests.items():
        tables = ", ".join(f"{name} {rows} rows" for name, rows in manifest["tables"].items()) or "model"
        _print(f"  {stage:<9} {shown(store.path(stage))}  {tables}")
    prompts = manifests.get("prompts")
    if prompts:
        stats = prompts["stats"]
        line = f"  prompts: {stats.get('prompts')} distinct, {stats.get('duplicates_merged', 0)} duplicate(s) merged"
        if "rejected_rows" in stats:
            rejected = stats["rejected_rows"]
            line += f"; {rejected} bad row(s) rejected {stats['rejected']}" if rejected else "; no bad rows"
            if rejected:
                line += f" -> {shown(store.path('prompts') / 'rejected_rows')}"
        _print(line)
    pairs = manifests.get("pairs")
    if pairs:
        stats = pairs["stats"]
        kept = {k: v for k, v in stats.items() if k.startswith("pairs_")}
        dropped = {k: v for k, v in stats.items() if k.startswith("dropped_") and v}
        _print(f"  pairs kept {kept}; dropped {dropped or 'none'}")
        for line in stats.get("warnings", []):
            _print(f"  warning: {line}")
        report = store.path("pairs") / "report.html"
        if report.exists():
            _print(f"  data-quality report (reward and margin distributions, reward-length correlation): {shown(report)}")
    export = manifests.get("export")
    if export:
        _print(f"  trained model ({export['stats']['kind']}): {shown(export['stats']['model'])}")
    result = manifests.get("eval")
    if result:
        s = result["stats"]
        _print(
            f"  eval on {s['prompts']} held-out prompts: mean reward {s['base_mean_reward']:.3f} (start) -> "
            f"{s['trained_mean_reward']:.3f} (trained); win rate of trained over start {s['win_rate']:.2f}"
        )
    chosen = manifests.get("select")
    if chosen:
        s = chosen["stats"]
        _print(
            f"  best-of-N: {s['prompts']} prompts, one best answer each -> {shown(store.path('select') / 'best')}; "
            f"{s['tied']} chosen among tied rewards; flagged: {s['all_truncated']} all candidates cut at the "
            f"token limit, {s['no_candidates']} without candidates"
        )
