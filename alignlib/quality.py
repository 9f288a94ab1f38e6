"""The data-quality report of the pairs stage: numbers for the manifest, and an HTML page of them.

In: the scored completions (or, for an imported preference set, its chosen and rejected answers),
the pairs, and the stage's counts. Out: `data_quality(...)`, a JSON-able dict stored in the pairs
manifest under `quality`, and `render_html(...)`, a self-contained page (inline SVG, no scripts)
written to `<output_dir>/pairs/report.html`:

- reward distribution per generator (count, mean, std, quantiles, histogram);
- margin distribution of the kept pairs, overall and per strategy;
- Pearson and Spearman correlation of reward with completion length (characters) per generator: a
  reward that rises with length is the classic sign of a reward model being gamed by verbosity;
- how often the chosen answer is the longer one, and every drop count.

Lengths are characters, the same unit as `pairs.length_penalty`, so every row has one.
"""

from __future__ import annotations

import html
import math
import statistics
from typing import Any, TypedDict

from alignlib import schema as S

BINS = 20
# |Spearman| from which the report flags a generator's reward as tracking length.
LENGTH_FLAG = 0.3


def _finite(values) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(v)]


def pearson(x: list[float], y: list[float]) -> float | None:
    """Sample correlation of x and y; None when either is constant or there are fewer than 2 points."""
    if len(x) != len(y):
        raise ValueError(f"pearson: {len(x)} x values but {len(y)} y values")
    if len(x) < 2:
        return None
    mx, my = statistics.fmean(x), statistics.fmean(y)
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y, strict=True))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    if sxx == 0 or syy == 0:
        return None
    return sxy / math.sqrt(sxx * syy)


def ranks(values: list[float]) -> list[float]:
    """1-based ranks; tied values share the mean of their ranks (as Spearman's rho needs)."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(x: list[float], y: list[float]) -> float | None:
    """Pearson correlation of the ranks: how monotonic the relation is, whatever its shape."""
    return pearson(ranks(x), ranks(y))


class Histogram(TypedDict, total=False):
    """`histogram`'s bins: `counts[i]` values in [edges[i], edges[i + 1]]. Read back from a manifest it may be `{}`
    (`describe` of no values has no histogram)."""

    edges: list[float]
    counts: list[int]


def histogram(values: list[float], bins: int = BINS) -> Histogram:
    """`bins` equal-width bins over [min, max] (the last bin includes max): edges and counts."""
    if not values:
        return {"edges": [], "counts": []}
    low, high = min(values), max(values)
    if low == high:
        return {"edges": [low, high], "counts": [len(values)]}
    width = (high - low) / bins
    counts = [0] * bins
    for v in values:
        counts[min(int((v - low) / width), bins - 1)] += 1
    return {"edges": [low + i * width for i in range(bins)] + [high], "counts": counts}


def describe(values: list[float]) -> dict[str, Any]:
    """count, mean, std (population), min, p25, median, p75, max and a histogram of finite values."""
    if not values:
        return {"count": 0}
    q = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else [values[0]] * 3
    return {
        "count": len(values),
        "mean": statistics.fmean(values),
        "std": statistics.pstdev(values),
        "min": min(values),
        "p25": q[0],
        "median": q[1],
        "p75": q[2],
        "max": max(values),
        "histogram": histogram(values),
    }


def _by_generator(by_generator: dict[str, list[dict]], column: str) -> tuple[dict, dict]:
    """Distribution of `column` and its correlation with completion length, per generator."""
    stats, correlation = {}, {}
    for generator, rows in sorted(by_generator.items()):
        rows = [r for r in rows if r.get(column) is not None and math.isfinite(r[column])]
        values = [float(r[column]) for r in rows]
        lengths = [float(len(r[S.COMPLETION])) for r in rows]
        stats[generator] = describe(values) | {"non_finite": len(by_generator[generator]) - len(rows)}
        correlation[generator] = {
            "n": len(rows),
            "pearson": pearson(lengths, values),
            "spearman": spearman(lengths, values),
        }
    return stats, correlation


def data_quality(completions: list[dict], pairs: list[dict], counts: dict[str, Any]) -> dict[str, Any]:
    """The report's numbers. `completions` need `generator`, `completion` and `reward` (and may
    carry the `reward_<name>` columns of combined rewards, which are reported one by one too)."""
    by_generator: dict[str, list[dict]] = {}
    for row in completions:
        by_generator.setdefault(row[S.GENERATOR], []).append(row)
    rewards, correlation = _by_generator(by_generator, S.REWARD)
    parts = sorted({k for r in completions[:1] for k in r if k.startswith("reward_") and k != S.REWARD_SOURCE})
    components = {}
    for column in parts:
        stats, corr = _by_generator(by_generator, column)
        components[column] = {"by_generator": stats, "length_correlation": corr}
    margins = _finite(p[S.MARGIN] for p in pairs)
    by_strategy: dict[str, list[float]] = {}
    for p in pairs:
        by_strategy.setdefault(p[S.STRATEGY], []).extend(_finite([p[S.MARGIN]]))
    longer = [len(p[S.CHOSEN]) > len(p[S.REJECTED]) for p in pairs]
    return {
        "reward_by_generator": rewards,
        "reward_length_correlation": correlation,
        "components": components,
        "margin": describe(margins),
        "margin_by_strategy": {s: describe(v) for s, v in sorted(by_strategy.items())},
        "chosen_longer_fraction": sum(longer) / len(longer) if longer else None,
        "chosen_mean_chars": statistics.fmean(len(p[S.CHOSEN]) for p in pairs) if pairs else None,
        "rejected_mean_chars": statistics.fmean(len(p[S.REJECTED]) for p in pairs) if pairs else None,
        "counts": {k: v for k, v in counts.items() if isinstance(v, int)},
    }


def imported_completions(pairs: list[dict]) -> list[dict]:
    """An imported preference set's answers as completions of generators `chosen` and `rejected`."""
    out = []
    for p in pairs:
        out.append({S.GENERATOR: S.CHOSEN, S.COMPLETION: p[S.CHOSEN], S.REWARD: p[S.CHOSEN_REWARD]})
        out.append({S.GENERATOR: S.REJECTED, S.COMPLETION: p[S.REJECTED], S.REWARD: p[S.REJECTED_REWARD]})
    return out


# -- HTML ---------------------------------------------------------------------------------------


def fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4g}" if value == value else "NaN"
    return str(value)


def svg_histogram(hist: Histogram, label: str, width: int = 360, height: int = 140) -> str:
    """Bars of a histogram as an inline SVG; each bar's tooltip gives its range and count."""
    counts, edges = hist.get("counts") or [], hist.get("edges") or []
    if not counts:
        return f'<svg class="hist" width="{width}" height="30"><text x="4" y="20">no values</text></svg>'
    top, pad, base = max(counts), 4, height - 18
    bar = (width - 2 * pad) / len(counts)
    parts = [
        f'<svg class="hist" role="img" aria-label="{html.escape(label)}" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" xmlns="http://www.w3.org/2000/svg">'
    ]
    for i, n in enumerate(counts):
        h = max((base - 12) * n / top, 1.0 if n else 0.0)  # a bin with any rows stays visible
        x = pad + i * bar
        title = f"[{fmt(edges[i])}, {fmt(edges[i + 1])}]: {n}"
        parts.append(
            f'<rect x="{x:.1f}" y="{base - h:.1f}" width="{max(bar - 1, 1):.1f}" height="{h:.1f}" '
            f'fill="#4878a8"><title>{html.escape(title)}</title></rect>'
        )
    parts.append(f'<line x1="{pad}" y1="{base}" x2="{width - pad}" y2="{base}" stroke="#333"/>')
    parts.append(f'<text x="{pad}" y="{height - 4}" font-size="11">{fmt(edges[0])}</text>')
    parts.append(f'<text x="{width - pad}" y="{height - 4}" font-size="11" text-anchor="end">{fmt(edges[-1])}</text>')
    parts.append(f'<text x="{pad}" y="10" font-size="11">max {top}</text></svg>')
    return "".join(parts)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(fmt(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


_STATS = ["count", "mean", "std", "min", "p25", "median", "p75", "max"]


def render_html(quality: dict[str, Any], title: str) -> str:
    """A self-contained page: drop counts, reward and margin distributions, reward-length correlation."""
    counts = quality["counts"]
    out = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>"
        "body{font-family:sans-serif;margin:2em;max-width:70em}table{border-collapse:collapse;margin:.5em 0}"
        "td,th{border:1px solid #ccc;padding:.2em .6em;text-align:right}"
        f"</style></head><body><h1>{html.escape(title)}</h1>"
    ]
    out.append("<h2>Counts</h2>" + _table(["count", "value"], [[k, v] for k, v in sorted(counts.items())]))
    out.append("<h2>Reward by generator</h2>")
    rewards = quality["reward_by_generator"]
    out.append(
        _table(
            ["generator", *_STATS, "non-finite"],
            [[g, *[d.get(k) for k in _STATS], d["non_finite"]] for g, d in rewards.items()],
        )
    )
    for generator, d in rewards.items():
        out.append(f"<h3>reward of {html.escape(generator)}</h3>")
        out.append(svg_histogram(d.get("histogram", {}), f"reward histogram of {generator}"))
    out.append("<h2>Reward vs completion length (characters)</h2>")
    rows = []
    for generator, c in quality["reward_length_correlation"].items():
        flagged = c["spearman"] is not None and abs(c["spearman"]) >= LENGTH_FLAG
        rows.append([generator, c["n"], c["pearson"], c["spearman"], "reward tracks length" if flagged else ""])
    out.append(_table(["generator", "n", "Pearson", "Spearman", f"|Spearman| >= {LENGTH_FLAG}"], rows))
    for column, part in quality["components"].items():
        out.append(f"<h3>{html.escape(column)} (one of the combined rewards)</h3>")
        out.append(
            _table(
                ["generator", "count", "mean", "std", "min", "max", "Pearson with length", "Spearman with length"],
                [
                    [
                        g,
                        d.get("count"),
                        d.get("mean"),
                        d.get("std"),
                        d.get("min"),
                        d.get("max"),
                        part["length_correlation"][g]["pearson"],
                        part["length_correlation"][g]["spearman"],
                    ]
                    for g, d in part["by_generator"].items()
                ],
            )
        )
    out.append(
        f"<p>chosen longer than rejected in {html.escape(fmt(quality['chosen_longer_fraction']))} of pairs; "
        f"mean characters chosen {html.escape(fmt(quality['chosen_mean_chars']))}, rejected "
        f"{html.escape(fmt(quality['rejected_mean_chars']))}.</p>"
    )
    out.append("<h2>Margin of kept pairs</h2>")
    margin = quality["margin"]
    strategies = quality["margin_by_strategy"]
    out.append(
        _table(
            ["strategy", *_STATS],
            [["all", *[margin.get(k) for k in _STATS]]]
            + [[s, *[d.get(k) for k in _STATS]] for s, d in strategies.items()],
        )
    )
    out.append(svg_histogram(margin.get("histogram", {}), "margin histogram"))
    out.append("</body></html>\n")
    return "\n".join(out)
