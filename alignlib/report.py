"""What a run prints at the end: where its outputs are, and the before/after numbers."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from alignlib.redaction import redact
from alignlib.store import StageStore
from alignlib.uri import shown

if TYPE_CHECKING:
    from alignlib.spec import JobSpec

Series = dict[str, list[tuple[float, float | None]]]  # name -> (x, y) points; a missing y is left out

__all__ = ["print_rounds", "print_summary", "render_rounds", "shown", "svg_lines"]


def _print(text: str) -> None:
    print(redact(text))  # paths and stats could carry a secret from the environment; never print one


def print_summary(spec: JobSpec, manifests: dict[str, dict[str, Any]]) -> None:
    """Where each stage's outputs are, then each stage's own summary lines (`StageResult.summary`)."""
    from alignlib.stages import stage

    store = StageStore(spec.output_dir)
    _print(f"\n== alignlib job {spec.name!r}: outputs under {shown(store.root)}")
    for name, manifest in manifests.items():
        tables = ", ".join(f"{table} {rows} rows" for table, rows in manifest["tables"].items()) or "model"
        _print(f"  {name:<9} {shown(store.path(name))}  {tables}")
    for name, manifest in manifests.items():
        declared = stage(name)
        for line in declared.result.from_stats(manifest.get("stats", {})).summary(store.path(name)):
            _print(line)


# -- rounds ---------------------------------------------------------------------------------------

# (key in the per-round figures, column header, format)
ROUND_COLUMNS = [
    ("held_out_reward", "held-out reward", "{:.3f}"),
    ("win_rate_vs_start", "win vs start", "{:.2f}"),
    ("win_rate_vs_previous", "win vs prev", "{:.2f}"),
    ("held_out_mean_tokens", "held-out tokens", "{:.1f}"),
    ("sample_mean_reward", "sample reward", "{:.3f}"),
    ("sample_max_reward", "max", "{:.3f}"),
    ("best_worst_gap", "best-worst", "{:.3f}"),
    ("tied_share", "tied", "{:.2f}"),
    ("sample_mean_tokens", "tokens", "{:.1f}"),
    ("best_of_n_mean_reward", "best-of-N", "{:.3f}"),
    ("final_train_loss", "loss", "{:.3f}"),
    ("engine_starts", "engines", "{}"),
    ("seconds", "seconds", "{:.0f}"),
]


def _cell(value: object, form: str) -> str:
    return "-" if value is None else form.format(value)


def print_rounds(spec: JobSpec, start: dict[str, Any], figures: list[dict[str, Any]]) -> None:
    """The per-round table the CLI ends a multi-round run with."""
    from alignlib.store import location

    root = location(spec.output_dir)
    _print(f"\n== alignlib job {spec.name!r}: {len(figures)} of {spec.rounds.count} round(s) under {shown(root)}")
    header = ["round", *[h for _, h, _ in ROUND_COLUMNS], "pairs kept"]
    rows = [["start", *[_cell(start.get(k), form) for k, _, form in ROUND_COLUMNS], "-"]]
    for f in figures:
        pairs = " ".join(f"{k}={v}" for k, v in (f.get("pairs") or {}).items()) or "-"
        rows.append([str(f["round"]), *[_cell(f.get(k), form) for k, _, form in ROUND_COLUMNS], pairs])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        _print(
            "  " + "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
        )
    _print(f"  per-round figures: {shown(root / 'rounds.json')}; curves: {shown(root / 'report.html')}")
    for line in _last_model(spec, figures):
        _print(line)
    _print(
        "  held-out reward: mean reward of the round's trained model on the held-out prompts (start: the "
        "policy before round 1); win: share of held-out prompts where it beats the start / the round before "
        "(ties count half); sample/best-of-N/tied: the round's own candidates"
    )


def _last_model(spec: JobSpec, figures: list[dict[str, Any]]) -> list[str]:
    """Where the last finished round's model is (its own summary line), when that round made one."""
    from alignlib.stages import MODEL_STAGE
    from alignlib.stages.export import ExportResult

    if not figures:
        return []
    k = figures[-1]["round"]
    manifest = StageStore(spec.output_dir, f"round-{k}").manifest(MODEL_STAGE)
    if manifest is None:
        return []
    result = ExportResult.from_stats(manifest.get("stats", {}))
    return [f"  model after round {k} ({result.kind}): {shown(result.model)}"]


def svg_lines(series: Series, label: str, width: int = 420, height: int = 180) -> str:
    """Line chart of named (x, y) series as an inline SVG, axes labelled with their ranges."""
    import html

    points = [(x, y) for pts in series.values() for x, y in pts if y is not None]
    if not points:
        return f'<svg width="{width}" height="30"><text x="4" y="20">no values</text></svg>'
    xs, ys = [x for x, _ in points], [y for _, y in points]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)
    pad, base = 36, height - 20

    def at(x: float, y: float) -> tuple[float, float]:
        return pad + (x - x0) / (x1 - x0) * (width - 2 * pad), base - (y - y0) / (y1 - y0) * (base - 14)

    colours = ["#4878a8", "#d0743c", "#5c9e58", "#a05195", "#777"]
    parts = [
        f'<svg role="img" aria-label="{html.escape(label)}" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" xmlns="http://www.w3.org/2000/svg">',
        f'<line x1="{pad}" y1="{base}" x2="{width - pad}" y2="{base}" stroke="#333"/>',
        f'<text x="2" y="{base}" font-size="11">{y0:.3g}</text><text x="2" y="14" font-size="11">{y1:.3g}</text>',
        f'<text x="{pad}" y="{height - 4}" font-size="11">{x0:g}</text>',
        f'<text x="{width - pad}" y="{height - 4}" font-size="11" text-anchor="end">{x1:g}</text>',
    ]
    for i, (name, pts) in enumerate(series.items()):
        known = [(x, y) for x, y in pts if y is not None]
        colour = colours[i % len(colours)]
        path = " ".join(f"{a:.1f},{b:.1f}" for a, b in (at(x, y) for x, y in known))
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{path}"/>')
        for x, y in known:
            cx, cy = at(x, y)
            parts.append(
                f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="3" fill="{colour}">'
                f"<title>{html.escape(name)} {x:g}: {y:.4g}</title></circle>"
            )
        parts.append(
            f'<text x="{width - pad + 2}" y="{14 + 12 * i}" font-size="11" fill="{colour}" '
            f'text-anchor="end">{html.escape(name)}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def render_rounds(
    spec: JobSpec, start: dict[str, Any], figures: list[dict[str, Any]], steps: dict[int, list[dict[str, Any]]]
) -> str:
    """One self-contained page for a multi-round run: curves across rounds, each round's loss, data links."""
    import html

    title = f"alignlib {spec.name}: {len(figures)} round(s)"
    out = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>"
        "body{font-family:sans-serif;margin:2em;max-width:70em}table{border-collapse:collapse;margin:.5em 0}"
        "td,th{border:1px solid #ccc;padding:.2em .6em;text-align:right}svg{margin:.5em 1em .5em 0}"
        f"</style></head><body><h1>{html.escape(title)}</h1>"
    ]

    def curve(key: str, name: str, with_start: bool = False) -> Series:
        pts = [(0, start.get(key))] if with_start else []
        return {name: pts + [(f["round"], f.get(key)) for f in figures]}

    out.append("<h2>Across rounds</h2>")
    out.append(svg_lines(curve("held_out_reward", "held-out reward", with_start=True), "held-out reward"))
    out.append(
        svg_lines(
            {**curve("win_rate_vs_start", "vs start"), **curve("win_rate_vs_previous", "vs previous")}, "win rates"
        )
    )
    out.append(
        svg_lines(
            {**curve("sample_mean_tokens", "candidates"), **curve("held_out_mean_tokens", "held-out")},
            "mean completion tokens",
        )
    )
    out.append(svg_lines(curve("tied_share", "tied prompts"), "share of tied prompts"))
    header = "".join(f"<th>{html.escape(h)}</th>" for h in ["round", *[h for _, h, _ in ROUND_COLUMNS], "pairs kept"])
    body = "".join(
        "<tr>"
        + f"<td>{f['round']}</td>"
        + "".join(f"<td>{_cell(f.get(k), form)}</td>" for k, _, form in ROUND_COLUMNS)
        + f"<td>{html.escape(json.dumps(f.get('pairs') or {}))}</td></tr>"
        for f in figures
    )
    out.append(f"<table><tr>{header}</tr>{body}</table>")
    out.append("<h2>Training loss per round</h2>")
    for k, rows in sorted(steps.items()):
        out.append(svg_lines({f"round {k}": [(r["step"], r.get("loss")) for r in rows]}, f"round {k} loss"))
    out.append("<h2>Preference data per round</h2><ul>")
    for f in figures:
        out.append(
            f"<li><a href='round-{f['round']}/pairs/report.html'>round {f['round']} data-quality report</a></li>"
        )
    out.append("</ul></body></html>\n")
    return "\n".join(out)
