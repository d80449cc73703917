"""The Grafana dashboard's panels as one static HTML page, from a Prometheus's query results.

Grafana is not packaged in Debian; this draws the same panels (deploy/grafana/sandbox.json: titles,
queries, legends, units) as inline SVG, so a screenshot shows what an operator would get.
"""
from __future__ import annotations

import html
import json
import re
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

COLORS = ("#3274d9", "#e02f44", "#56a64b", "#ff9830", "#a352cc", "#8ab8ff", "#f2cc0c", "#73bf69", "#fade2a", "#ca95e5")
WIDTH, HEIGHT = 560, 190


def query(prometheus: str, path: str, **params: Any) -> list[dict]:
    url = f"{prometheus}/api/v1/{path}?{urllib.parse.urlencode(params)}"
    with urllib.request.urlopen(url, timeout=30) as r:  # noqa: S310 - our own loopback Prometheus
        answer = json.load(r)
    if answer.get("status") != "success":
        raise RuntimeError(f"{url}: {answer}")
    return answer["data"]["result"]


def legend(fmt: str, labels: dict[str, str]) -> str:
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt) or json.dumps(labels)


def fmt_value(value: float, unit: str) -> str:
    if value != value:  # NaN: no data in the window
        return "–"
    if unit == "percentunit":
        return f"{value * 100:.1f}%"
    if unit == "s":
        return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"
    if unit == "bytes":
        for size, name in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
            if value >= size:
                return f"{value / size:.1f} {name}"
        return f"{value:.0f} B"
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"


def timeseries(series: list[tuple[str, list[tuple[float, float]]]], start: float, end: float, unit: str) -> str:
    points = [v for _, pts in series for _, v in pts if v == v]
    top = max(points + [0.0]) or 1.0
    top *= 1.1
    svg = [f'<svg width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}">']
    for i in range(5):
        y = 10 + (HEIGHT - 30) * i / 4
        svg.append(f'<line x1="60" x2="{WIDTH}" y1="{y:.1f}" y2="{y:.1f}" stroke="#2c3235"/>'
                   f'<text x="55" y="{y + 4:.1f}" text-anchor="end">{html.escape(fmt_value(top * (4 - i) / 4, unit))}</text>')
    span = max(end - start, 1.0)
    for n, (_, pts) in enumerate(series):
        coords = " ".join(f"{60 + (WIDTH - 65) * (t - start) / span:.1f},{10 + (HEIGHT - 30) * (1 - v / top):.1f}"
                          for t, v in pts if v == v)
        svg.append(f'<polyline fill="none" stroke-width="2" stroke="{COLORS[n % len(COLORS)]}" points="{coords}"/>')
    svg.append(f'<text x="60" y="{HEIGHT - 4}">-{(end - start) / 60:.0f} min</text>'
               f'<text x="{WIDTH - 5}" y="{HEIGHT - 4}" text-anchor="end">now</text></svg>')
    keys = "".join(f'<span><i style="background:{COLORS[n % len(COLORS)]}"></i>{html.escape(name)} '
                   f'<b>{html.escape(fmt_value(pts[-1][1], unit)) if pts else "–"}</b></span>'
                   for n, (name, pts) in enumerate(series))
    return "".join(svg) + f'<div class="legend">{keys}</div>'


def values(rows: list[tuple[str, float]], unit: str, bars: bool) -> str:
    if not rows:
        return '<div class="empty">no data</div>'
    if not bars:
        return "".join(f'<div class="stat"><b>{html.escape(fmt_value(v, unit))}</b><span>{html.escape(n)}</span></div>'
                       for n, v in rows)
    top = max(v for _, v in rows) or 1.0
    return "".join(f'<div class="bar"><span>{html.escape(n)}</span><i style="width:{max(v / top, 0.01) * 60:.1f}%"></i>'
                   f'<b>{html.escape(fmt_value(v, unit))}</b></div>' for n, v in sorted(rows, key=lambda r: -r[1]))


def panel(prometheus: str, spec: dict[str, Any], start: float, end: float, step_s: float) -> str:
    unit = spec.get("fieldConfig", {}).get("defaults", {}).get("unit", "short")
    if spec["type"] == "timeseries":
        series = []
        for target in spec["targets"]:
            for result in query(prometheus, "query_range", query=target["expr"], start=start, end=end, step=step_s):
                series.append((legend(target.get("legendFormat", ""), result["metric"]),
                               [(float(t), float(v)) for t, v in result["values"]]))
        body = timeseries(series, start, end, unit) if series else '<div class="empty">no data</div>'
    else:
        rows = [(legend(target.get("legendFormat", ""), r["metric"]), float(r["value"][1]))
                for target in spec["targets"] for r in query(prometheus, "query", query=target["expr"], time=end)]
        body = values(rows, unit, bars=spec["type"] == "bargauge")
    queries = "<br>".join(html.escape(t["expr"]) for t in spec["targets"])
    return (f'<section class="{spec["type"]}"><h2>{html.escape(spec["title"])}</h2>{body}'
            f'<code>{queries}</code></section>')


def render(prometheus: str, dashboard: Path, start: float, end: float, note: str) -> str:
    """The whole page: every panel of the dashboard, in its order."""
    spec = json.loads(dashboard.read_text())
    step_s = max((end - start) / 200, 1.0)
    body = "".join(panel(prometheus, p, start, end, step_s) for p in spec["panels"])
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(spec['title'])}</title>
<style>
body{{background:#111217;color:#ccccdc;font:13px/1.4 'DejaVu Sans',sans-serif;margin:16px}}
h1{{font-size:20px;margin:0 0 4px}} .note{{color:#8e8e8e;margin-bottom:12px}}
main{{display:grid;grid-template-columns:repeat(2,600px);gap:12px}}
section{{background:#181b1f;border:1px solid #2c3235;border-radius:4px;padding:10px}}
h2{{font-size:14px;margin:0 0 8px}} svg text{{fill:#8e8e8e;font-size:10px}}
.legend span{{margin-right:12px;white-space:nowrap}} .legend i{{display:inline-block;width:12px;height:3px;margin-right:4px;vertical-align:middle}}
.stat{{display:inline-block;margin:6px 24px 6px 0}} .stat b{{display:block;font-size:30px;color:#73bf69}}
.bar{{display:flex;align-items:center;margin:3px 0}} .bar span{{width:40%;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}}
.bar i{{display:inline-block;height:14px;background:#3274d9;margin:0 6px}}
code{{display:block;color:#6e6e7e;font-size:10px;margin-top:6px;word-break:break-all}} .empty{{color:#6e6e7e;padding:30px}}
</style></head><body><h1>{html.escape(spec['title'])}</h1><div class="note">{html.escape(note)}</div>
<main>{body}</main></body></html>"""
