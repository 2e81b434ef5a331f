"""Evaluation report: `report.md`, a self-contained `report.html` and PNG plots under `plots/`.

The HTML needs nothing but itself: CSS is inline and plots are embedded as base64 `data:` URIs, so
it can be mailed or attached to an issue. Tables mark the better direction of each metric with an
arrow (↑ higher is better, ↓ lower is better) and bold the best value of such a column. Example
completions are HTML-escaped and folded into `<details>` blocks. Every file is written to a
temporary name in the same folder and renamed into place, so a crash never leaves half a report.

Plots use matplotlib's object API with the Agg canvas (no pyplot, no global backend switch).
"""

from __future__ import annotations

import base64
import html
import io
import math
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

from cada_jax.files import atomic_write_bytes

__all__ = ["format_table", "write_report"]

ARROWS = {"up": "↑", "down": "↓"}


def _slug(text: str, taken: set[str]) -> str:
    base = re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_").lower() or "plot"
    slug, i = base, 2
    while slug in taken:
        slug, i = f"{base}_{i}", i + 1
    taken.add(slug)
    return slug


# ---------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------


def _number(v: Any) -> float | None:
    """The numeric value of a cell (a number, or a summary entry {"value": ...}), else None."""
    if isinstance(v, Mapping):
        v = v.get("value", v.get("mean"))
    if isinstance(v, bool) or v is None:
        return None
    if isinstance(v, (int, float)):
        f = float(v)
        return None if math.isnan(f) else f
    return None


def _fmt(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, Mapping) and ("value" in v or "mean" in v):
        val = v.get("value", v.get("mean"))
        ci = v.get("ci")
        s = _fmt(val)
        if isinstance(ci, (list, tuple)) and len(ci) == 2 and all(_number(c) is not None for c in ci):
            s += f" [{float(ci[0]):.3f}, {float(ci[1]):.3f}]"
        return s
    if isinstance(v, float):
        return "—" if math.isnan(v) else f"{v:.3f}"
    return str(v)


def _normalise_table(columns: Sequence[str], rows: Sequence[Any], better: Mapping[str, str] | None, title: str) -> tuple[list[str], list[list[Any]], dict[str, str]]:
    columns = [str(c) for c in columns]
    if not columns:
        raise ValueError(f"table {title!r}: no columns; pass columns=[...]")
    better = dict(better or {})
    for col, direction in better.items():
        if col not in columns:
            raise ValueError(f"table {title!r}: better names column {col!r}, which is not one of {', '.join(columns)}")
        if direction not in ARROWS:
            raise ValueError(f"table {title!r}: better[{col!r}] is {direction!r}; use 'up' or 'down'")
    out_rows: list[list[Any]] = []
    for i, row in enumerate(rows):
        if isinstance(row, Mapping):
            unknown = [k for k in row if k not in columns]
            if unknown:
                raise ValueError(f"table {title!r} row {i}: keys {unknown} are not columns ({', '.join(columns)})")
            out_rows.append([row.get(c) for c in columns])
        else:
            cells = list(row)
            if len(cells) != len(columns):
                raise ValueError(f"table {title!r} row {i}: {len(cells)} cells for {len(columns)} columns ({', '.join(columns)})")
            out_rows.append(cells)
    return columns, out_rows, better


def _best_rows(columns: list[str], rows: list[list[Any]], better: Mapping[str, str]) -> dict[int, set[int]]:
    """{column index: row indices holding the best value} for columns with a direction."""
    best: dict[int, set[int]] = {}
    for j, col in enumerate(columns):
        if col not in better:
            continue
        vals = [(i, _number(r[j])) for i, r in enumerate(rows)]
        vals = [(i, v) for i, v in vals if v is not None]
        if len(vals) < 2:
            continue
        target = max(v for _, v in vals) if better[col] == "up" else min(v for _, v in vals)
        best[j] = {i for i, v in vals if v == target}
    return best


def _header(col: str, better: Mapping[str, str]) -> str:
    return f"{col} {ARROWS[better[col]]}" if col in better else col


def _md_cell(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def format_table(columns: Sequence[str], rows: Sequence[Any], better: Mapping[str, str] | None = None) -> str:
    """A markdown (and terminal-readable) table; headers carry ↑/↓ and the best values are bold.

    rows: sequences with one cell per column, or dicts keyed by column. Cells: numbers (floats to
    3 decimals), None (—), strings, or summary entries {"value", "ci"} shown as "v [lo, hi]".
    """
    columns, rows_n, better = _normalise_table(columns, rows, better, "table")
    best = _best_rows(columns, rows_n, better)
    head = [_md_cell(_header(c, better)) for c in columns]
    body = []
    for i, r in enumerate(rows_n):
        cells = []
        for j, v in enumerate(r):
            s = _md_cell(_fmt(v))
            cells.append(f"**{s}**" if i in best.get(j, ()) else s)
        body.append(cells)
    widths = [max([len(head[j])] + [len(b[j]) for b in body]) for j in range(len(columns))]
    lines = [
        "| " + " | ".join(h.ljust(w) for h, w in zip(head, widths)) + " |",
        "| " + " | ".join("-" * w for w in widths) + " |",
    ]
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(b, widths)) + " |" for b in body]
    return "\n".join(lines)


def _html_table(title: str, columns: Sequence[str], rows: Sequence[Any], better: Mapping[str, str] | None) -> str:
    columns, rows_n, better = _normalise_table(columns, rows, better, title)
    best = _best_rows(columns, rows_n, better)
    parts = [f"<h3>{html.escape(title)}</h3>", '<table><thead><tr>']
    for c in columns:
        tip = ""
        if c in better:
            tip = f' title="{"higher" if better[c] == "up" else "lower"} is better"'
        parts.append(f"<th{tip}>{html.escape(_header(c, better))}</th>")
    parts.append("</tr></thead><tbody>")
    for i, r in enumerate(rows_n):
        parts.append("<tr>")
        for j, v in enumerate(r):
            s = html.escape(_fmt(v))
            cls = ' class="num"' if _number(v) is not None else ""
            parts.append(f"<td{cls}><strong>{s}</strong></td>" if i in best.get(j, ()) else f"<td{cls}>{s}</td>")
        parts.append("</tr>")
    parts.append("</tbody></table>")
    return "".join(parts)


# ---------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------

CURVE_GROUPS = (
    ("reward", "Reward", re.compile(r"reward", re.IGNORECASE)),
    ("kl", "KL to reference", re.compile(r"(^|[^a-z])kl([^a-z]|$)", re.IGNORECASE)),
    ("completion_length", "Completion length", re.compile(r"length|(^|[/_.])len($|[/_.])|num_tokens", re.IGNORECASE)),
)


def _png(fig: Any) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()


def _curve_series(curves: Sequence[Mapping[str, Any]]) -> dict[str, list[tuple[float, float]]]:
    series: dict[str, list[tuple[float, float]]] = {}
    for i, row in enumerate(curves):
        if not isinstance(row, Mapping):
            raise ValueError(f"curves[{i}]: expected a dict (a metrics.jsonl row), got {type(row).__name__}")
        step = row.get("step", i)
        if isinstance(step, bool) or not isinstance(step, (int, float)):
            raise ValueError(f"curves[{i}]: 'step' is {step!r}; expected a number")
        for key, v in row.items():
            if key == "step" or isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(float(v)):
                continue
            series.setdefault(str(key), []).append((float(step), float(v)))
    return series


def _curve_plots(curves: Sequence[Mapping[str, Any]]) -> list[tuple[str, str, bytes]]:
    """[(slug, title, png bytes)] for each curve group that has data."""
    from matplotlib.figure import Figure

    series = _curve_series(curves)
    out = []
    for slug, title, pattern in CURVE_GROUPS:
        keys = [k for k in series if pattern.search(k)]
        if not keys:
            continue
        fig = Figure(figsize=(6.0, 3.6))
        ax = fig.add_subplot(1, 1, 1)
        for k in keys:
            pts = sorted(series[k])
            xs, ys = [p[0] for p in pts], [p[1] for p in pts]
            ax.plot(xs, ys, marker="o" if len(pts) <= 30 else None, markersize=3, linewidth=1.5, label=k)
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        if len(keys) > 1:
            ax.legend(fontsize=8)
        out.append((f"curve_{slug}", title, _png(fig)))
    return out


def _category_value(v: Any) -> tuple[float | None, tuple[float, float] | None]:
    if isinstance(v, Mapping):
        val = _number(v)
        ci = v.get("ci")
        if isinstance(ci, (list, tuple)) and len(ci) == 2 and all(_number(c) is not None for c in ci):
            return val, (float(ci[0]), float(ci[1]))
        return val, None
    return _number(v), None


def _category_plot(metric: str, cats: Mapping[str, Any]) -> bytes | None:
    from matplotlib.figure import Figure

    items = [(str(c), *_category_value(v)) for c, v in cats.items()]
    items = [(c, v, ci) for c, v, ci in items if v is not None]
    if not items:
        return None
    fig = Figure(figsize=(6.0, max(1.6, 0.35 * len(items) + 1.0)))
    ax = fig.add_subplot(1, 1, 1)
    ys = list(range(len(items)))
    vals = [v for _, v, _ in items]
    xerr = None
    if all(ci is not None for _, _, ci in items):
        xerr = [[max(0.0, v - ci[0]) for _, v, ci in items], [max(0.0, ci[1] - v) for _, v, ci in items]]
    ax.barh(ys, vals, xerr=xerr, color="#4c72b0", capsize=3)
    ax.set_yticks(ys)
    ax.set_yticklabels([c for c, _, _ in items], fontsize=8)
    ax.invert_yaxis()
    ax.set_title(metric)
    ax.grid(True, axis="x", alpha=0.3)
    return _png(fig)


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------

_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1100px;color:#222;padding:0 1em}
h1{border-bottom:2px solid #ddd;padding-bottom:.3em}
table{border-collapse:collapse;margin:.5em 0 1.5em 0;font-size:14px}
th,td{border:1px solid #ccc;padding:4px 10px;text-align:left}
th{background:#f3f3f3}
td.num{text-align:right;font-variant-numeric:tabular-nums}
img{max-width:100%;border:1px solid #eee;margin:.5em 0}
details{border:1px solid #ddd;border-radius:4px;margin:.5em 0;padding:.3em .8em}
summary{cursor:pointer;font-weight:600}
pre{white-space:pre-wrap;word-wrap:break-word;background:#f8f8f8;padding:.6em;border-radius:3px;font-size:13px}
.verdict{display:inline-block;padding:0 .5em;border-radius:3px;background:#eee;font-weight:400}
.muted{color:#777}
"""

_EXAMPLE_FIELDS = ("prompt", "reasoning", "answer")


def _fence(text: str) -> str:
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    return "`" * max(3, longest + 1)


def _example_summary(i: int, ex: Mapping[str, Any]) -> str:
    kind = str(ex.get("kind") or "example")
    verdict = ex.get("verdict")
    prompt = " ".join(str(ex.get("prompt") or "").split())
    short = prompt if len(prompt) <= 90 else prompt[:87] + "..."
    return f"{i + 1}. [{kind}]" + (f" {verdict}" if verdict not in (None, "") else "") + (f" — {short}" if short else "")


def write_report(
    out_dir: str | Path,
    *,
    title: str,
    tables: Sequence[Mapping[str, Any]] = (),
    curves: Sequence[Mapping[str, Any]] = (),
    per_category: Mapping[str, Mapping[str, Any]] | None = None,
    examples: Sequence[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    """Write report.md, report.html and plots/*.png under `out_dir`; return their paths.

    tables: [{"title", "columns", "rows", "better": {column: "up"|"down"}}].
    curves: metrics.jsonl rows ({"step": int, <metric>: number, ...}); keys containing "reward",
        a "kl" token, or "length"/"len" are plotted against step (one PNG per group).
    per_category: {metric: {category: value or {"mean"/"value", "ci"}}}; one bar chart per metric.
    examples: [{"kind", "prompt", "reasoning", "answer", "verdict"}], shown folded.
    Returns {"markdown": Path, "html": Path, "plots": [Path, ...]}.
    """
    out = Path(out_dir)
    plots_dir = out / "plots"
    per_category = dict(per_category or {})
    for i, t in enumerate(tables):
        for key in ("columns", "rows"):
            if key not in t:
                raise ValueError(f"tables[{i}]: missing key {key!r}; a table is {{'title', 'columns', 'rows', 'better'}}")

    taken: set[str] = set()
    plots: list[tuple[str, str, bytes, str]] = []  # (section, title, png, file name)
    for slug, ptitle, png in _curve_plots(list(curves)):
        plots.append(("curves", ptitle, png, _slug(slug, taken) + ".png"))
    for metric, cats in per_category.items():
        png = _category_plot(str(metric), cats)
        if png is not None:
            plots.append(("per_category", str(metric), png, _slug(f"per_category_{metric}", taken) + ".png"))

    plot_paths = []
    for _, _, png, fname in plots:
        p = plots_dir / fname
        atomic_write_bytes(p, png)
        plot_paths.append(p)

    # ---- markdown
    md: list[str] = [f"# {title}", ""]
    if tables:
        md += ["## Results", ""]
        for t in tables:
            md += [f"### {t.get('title', '')}", "", format_table(t["columns"], t["rows"], t.get("better")), ""]
        md += ["↑ higher is better, ↓ lower is better; the best value of such a column is bold.", ""]
    curve_plots = [p for p in plots if p[0] == "curves"]
    if curve_plots:
        md += ["## Training curves", ""]
        md += [f"![{ptitle}](plots/{fname})" for _, ptitle, _, fname in curve_plots] + [""]
    if per_category:
        md += ["## Per category", ""]
        for metric, cats in per_category.items():
            rows = [[c, v] for c, v in cats.items()]
            md += [f"### {metric}", "", format_table(["category", str(metric)], rows), ""]
            fname = next((f for s, pt, _, f in plots if s == "per_category" and pt == str(metric)), None)
            if fname:
                md += [f"![{metric}](plots/{fname})", ""]
    if examples:
        md += ["## Examples", ""]
        for i, ex in enumerate(examples):
            md += [f"<details><summary>{html.escape(_example_summary(i, ex))}</summary>", ""]
            for field in _EXAMPLE_FIELDS:
                text = str(ex.get(field) or "")
                if text:
                    fence = _fence(text)
                    md += [f"**{field}**", "", fence + "text", text, fence, ""]
            md += ["</details>", ""]

    # ---- html
    h: list[str] = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    if tables:
        h.append("<h2>Results</h2>")
        for t in tables:
            h.append(_html_table(str(t.get("title", "")), t["columns"], t["rows"], t.get("better")))
        h.append('<p class="muted">↑ higher is better, ↓ lower is better; the best value of such a column is bold.</p>')
    if curve_plots:
        h.append("<h2>Training curves</h2>")
        for _, ptitle, png, _ in curve_plots:
            h.append(f'<img alt="{html.escape(ptitle)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">')
    if per_category:
        h.append("<h2>Per category</h2>")
        for metric, cats in per_category.items():
            h.append(_html_table(str(metric), ["category", str(metric)], [[c, v] for c, v in cats.items()], None))
            png = next((p for s, pt, p, _ in plots if s == "per_category" and pt == str(metric)), None)
            if png is not None:
                h.append(f'<img alt="{html.escape(str(metric))}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">')
    if examples:
        h.append("<h2>Examples</h2>")
        for i, ex in enumerate(examples):
            verdict = ex.get("verdict")
            summary = html.escape(_example_summary(i, ex))
            h.append(f"<details><summary>{summary}</summary>")
            if verdict not in (None, ""):
                h.append(f'<p>verdict: <span class="verdict">{html.escape(str(verdict))}</span></p>')
            for field in _EXAMPLE_FIELDS:
                text = str(ex.get(field) or "")
                if text:
                    h.append(f"<h4>{field}</h4><pre>{html.escape(text)}</pre>")
            h.append("</details>")
    h.append("</body></html>")

    md_path, html_path = out / "report.md", out / "report.html"
    atomic_write_bytes(md_path, ("\n".join(md).rstrip() + "\n").encode("utf-8"))
    atomic_write_bytes(html_path, ("\n".join(h) + "\n").encode("utf-8"))
    return {"markdown": md_path, "html": html_path, "plots": plot_paths}
