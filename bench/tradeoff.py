"""The papers' trade-off plot, measured on the user's own hardware: latency against MACs and against
parameters, one point per served model, and the same as a table."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

from bench.load import Cell
from bench.servers import http_get

TRADEOFF_COLUMNS = ("model", "precision", "params", "MACs", "bare p50 ms", "service p50 ms", "threads", "ms per GMAC")


@dataclass(frozen=True)
class TradeoffPoint:
    """One served model: its size and cost from its metadata, its latency from the run."""

    model: str
    architecture: str
    precision: str  # "fp32" or "int8"
    weights: str  # the metadata's weights.kind
    params: int | None
    macs: int | None
    bare_p50_ms: float | None  # session.run at batch 1, with the threads a lone request gets
    service_p50_ms: float | None  # end to end, at the run's lowest concurrency
    intra_op_threads: int | None


def served_metadata(host: str, port: int) -> dict[str, dict]:
    """Each ready model's metadata.json, as the service's /models reports it (none from a server
    without /models)."""
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        reply = http_get(host, port, "/models")
        if reply.status == 200:
            return {m["name"]: m["metadata"] for m in reply.json()["models"]
                    if m.get("status") == "ready" and m.get("metadata")}
    return {}


def tradeoff_points(cells: list[Cell], metadata: dict[str, dict], server: str = "service",
                    protocol: str = "predict") -> list[TradeoffPoint]:
    """A point for each model `server` served over `protocol` and the run measured, cheapest first."""
    measured = [c for c in cells if c.server == server and c.protocol == protocol]
    if not measured:
        return []
    lowest = min(c.concurrency for c in measured)
    points = []
    for cell in measured:
        meta = metadata.get(cell.model)
        if cell.concurrency != lowest or meta is None:
            continue
        points.append(TradeoffPoint(
            model=cell.model, architecture=meta.get("architecture", ""),
            precision=(meta.get("quantization") or {}).get("precision", "fp32"),
            weights=meta.get("weights", {}).get("kind", ""), params=meta.get("params"), macs=meta.get("macs"),
            bare_p50_ms=cell.bare_p50_ms, service_p50_ms=cell.p50_ms, intra_op_threads=cell.intra_op_threads))
    return sorted(points, key=lambda p: (p.macs or 0, p.model))


def tradeoff_row(point: TradeoffPoint) -> tuple[str, ...]:
    ms = lambda value: "-" if value is None else f"{value:.2f}"  # noqa: E731
    per_gmac = (point.bare_p50_ms / (point.macs / 1e9)) if point.bare_p50_ms and point.macs else None
    return (point.model, point.precision, f"{point.params:,}" if point.params else "-",
            f"{point.macs / 1e6:.1f}M" if point.macs else "-", ms(point.bare_p50_ms), ms(point.service_p50_ms),
            str(point.intra_op_threads or "-"), ms(per_gmac))


def write_tradeoff_chart(points: list[TradeoffPoint], path: Path) -> None:
    """p50 latency against MACs (left) and parameters (right), log-log: bare `session.run` as
    filled markers, the service end to end as open ones; INT8 models as squares."""
    import matplotlib  # an optional dependency (the `bench` extra), imported where it is used

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    figure, axes = plt.subplots(1, 2, figsize=(13, 5.5))
    for ax, attribute, label in ((axes[0], "macs", "MACs (millions)"), (axes[1], "params", "parameters (millions)")):
        for point in points:
            x = getattr(point, attribute)
            if not x:
                continue
            marker = "s" if point.precision == "int8" else "o"
            if point.bare_p50_ms:
                ax.scatter(x / 1e6, point.bare_p50_ms, marker=marker, color="tab:blue")
            if point.service_p50_ms:
                ax.scatter(x / 1e6, point.service_p50_ms, marker=marker, facecolors="none", edgecolors="tab:orange")
            y = point.bare_p50_ms or point.service_p50_ms
            if y:
                ax.annotate(point.model, (x / 1e6, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_yscale("log")
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:g}"))
            axis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel(label)
        ax.set_ylabel("p50 latency, ms")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_title("Latency against MACs")
    axes[1].set_title("Latency against parameters")
    handles = [plt.Line2D([], [], marker="o", linestyle="", color="tab:blue", label="bare session.run, batch 1"),
               plt.Line2D([], [], marker="o", linestyle="", markerfacecolor="none", markeredgecolor="tab:orange",
                          label="service end to end, lowest concurrency"),
               plt.Line2D([], [], marker="s", linestyle="", color="grey", label="INT8")]
    figure.legend(handles=handles, loc="lower center", ncols=3, fontsize=8)
    figure.tight_layout(rect=(0, 0.06, 1, 1))
    figure.savefig(path, dpi=110)
    plt.close(figure)
