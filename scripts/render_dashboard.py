"""Render the Grafana dashboard's panels from a real Prometheus, without Grafana.

Grafana is not installable on the CI machines (no Debian package, no registry for its image),
so the README's dashboard picture is drawn here: every panel of
deploy/grafana/dashboards/ets.json, every query exactly as written (``$__rate_interval``
replaced by ``--rate-interval``), evaluated by Prometheus's ``query_range`` API and plotted
with matplotlib in the dashboard's grid layout.

    .venv/bin/python scripts/render_dashboard.py --prometheus http://127.0.0.1:9090 --out dash.png
"""
from __future__ import annotations

import argparse
import json
import re
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy/grafana/dashboards/ets.json"
UNIT_LABELS = {"reqps": "per second", "percentunit": "ratio", "s": "seconds", "short": ""}


def query_range(prometheus: str, expr: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
    """Evaluate one PromQL expression over a range; raise on a query error."""
    params = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": step})
    with urllib.request.urlopen(f"{prometheus}/api/v1/query_range?{params}", timeout=30) as resp:
        body = json.load(resp)
    if body.get("status") != "success":
        raise RuntimeError(f"query failed: {expr}: {body}")
    return body["data"]["result"]


def legend(fmt: str, labels: dict[str, str]) -> str:
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt).strip() or "series"


def expand(expr: str, rate_interval: str) -> str:
    return expr.replace("$__rate_interval", rate_interval)


def render(prometheus: str, out: Path, minutes: float, rate_interval: str, step: float) -> dict[str, int]:
    """Draw every panel; return panel title -> number of series with data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt
    from datetime import UTC, datetime

    dash = json.loads(DASHBOARD.read_text())
    panels = dash["panels"]
    rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels)
    end = time.time()
    start = end - minutes * 60
    fig = plt.figure(figsize=(16, rows * 0.55))
    grid = fig.add_gridspec(rows, 24, hspace=1.6, wspace=1.2)
    counts: dict[str, int] = {}
    for panel in panels:
        g = panel["gridPos"]
        ax = fig.add_subplot(grid[g["y"]:g["y"] + g["h"] - 1, g["x"]:g["x"] + g["w"] - 1])
        n = 0
        for target in panel["targets"]:
            for series in query_range(prometheus, expand(target["expr"], rate_interval), start, end, step):
                pts = [(float(t), float(v)) for t, v in series["values"] if v not in ("NaN", "+Inf", "-Inf")]
                if not pts:
                    continue
                # Any: matplotlib's stubs accept numbers only; it converts datetimes itself.
                xs: Any = [datetime.fromtimestamp(t, tz=UTC) for t, _ in pts]
                ax.plot(xs, [v for _, v in pts], label=legend(target.get("legendFormat", ""), series["metric"]))
                n += 1
        counts[panel["title"]] = n
        ax.set_title(panel["title"], fontsize=10, loc="left")
        ax.set_ylabel(UNIT_LABELS.get(panel["fieldConfig"]["defaults"].get("unit", ""), ""), fontsize=8)
        # The whole window on every panel, also on one with no series (Grafana's "No data").
        window: Any = (datetime.fromtimestamp(start, tz=UTC), datetime.fromtimestamp(end, tz=UTC))
        ax.set_xlim(*window)
        ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M"))
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if n:
            ax.legend(fontsize=6, loc="upper left")
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="grey")
    fig.suptitle(f"{dash['title']} (rendered from Prometheus at {prometheus}, last {minutes:g} min, UTC)",
                 fontsize=11)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80, bbox_inches="tight")
    plt.close(fig)
    return counts


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prometheus", default="http://127.0.0.1:9090")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--rate-interval", default="1m")
    p.add_argument("--step", type=float, default=5.0)
    args = p.parse_args(argv)
    counts = render(args.prometheus.rstrip("/"), args.out, args.minutes, args.rate_interval, args.step)
    for title, n in counts.items():
        print(f"{title}: {n} series")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
