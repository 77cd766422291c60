"""What a bench run tells a reader: the table of cells, the service against the baseline, the Open
Inference Protocol over gRPC against over REST, the servers' start-up and memory, and the chart."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bench.bare import BareRun
from bench.load import Cell
from bench.tradeoff import TRADEOFF_COLUMNS, TradeoffPoint, tradeoff_row

COLUMNS = ("server", "model", "clients", "req/s", "p50 ms", "p90 ms", "p99 ms", "errors",
           "threads", "bare p50 ms", "p50/bare", "prep p50 ms", "server CPU ms/req", "protocol")
VERSUS_COLUMNS = ("model", "clients", "service/baseline req/s", "service p99 ms", "baseline p99 ms")
GRPC_VS_REST_COLUMNS = ("model", "clients", "REST CPU ms/req", "gRPC CPU ms/req", "gRPC/REST CPU",
                        "REST req/s", "gRPC req/s", "gRPC/REST req/s")


@dataclass(frozen=True)
class Comparison:
    """The service against the baseline at one model and concurrency."""

    model: str
    concurrency: int
    throughput_ratio: float
    service_p99_ms: float | None
    baseline_p99_ms: float | None


def comparisons(cells: list[Cell]) -> list[Comparison]:
    """Service against baseline on /predict, per model and concurrency, where both were measured."""
    baseline = {(c.model, c.concurrency): c for c in cells if c.server == "baseline"}
    found = []
    for cell in cells:
        other = baseline.get((cell.model, cell.concurrency))
        if cell.server != "baseline" and cell.protocol == "predict" and other and other.requests_per_s:
            found.append(Comparison(cell.model, cell.concurrency,
                                    round(cell.requests_per_s / other.requests_per_s, 3),
                                    cell.p99_ms, other.p99_ms))
    return found


@dataclass(frozen=True)
class GrpcVsRest:
    """The same photo as a BYTES input of the Open Inference Protocol, over gRPC and over REST, to
    one server at one model and concurrency; each ratio is gRPC's over REST's."""

    model: str
    concurrency: int
    rest_cpu_ms_per_request: float | None
    grpc_cpu_ms_per_request: float | None
    cpu_ratio: float | None
    rest_requests_per_s: float
    grpc_requests_per_s: float
    throughput_ratio: float | None


def grpc_vs_rest(cells: list[Cell]) -> list[GrpcVsRest]:
    """gRPC against REST, per model and concurrency, where both were measured."""
    rest = {(c.server, c.model, c.concurrency): c for c in cells if c.protocol == "rest"}
    found = []
    for cell in (c for c in cells if c.protocol == "grpc"):
        other = rest.get((cell.server, cell.model, cell.concurrency))
        if other is None or not (other.ok and cell.ok):  # a model neither protocol could serve
            continue
        rest_cpu, grpc_cpu = other.server_cpu_ms_per_request, cell.server_cpu_ms_per_request
        found.append(GrpcVsRest(
            cell.model, cell.concurrency, rest_cpu, grpc_cpu,
            round(grpc_cpu / rest_cpu, 3) if grpc_cpu is not None and rest_cpu else None,
            other.requests_per_s, cell.requests_per_s,
            round(cell.requests_per_s / other.requests_per_s, 3) if other.requests_per_s else None))
    return found


def ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def table_row(cell: Cell) -> tuple[str, ...]:
    ratio = cell.p50_ms / cell.bare_p50_ms if cell.p50_ms and cell.bare_p50_ms else None
    return (cell.server, cell.model, str(cell.concurrency), f"{cell.requests_per_s:.1f}",
            ms(cell.p50_ms), ms(cell.p90_ms), ms(cell.p99_ms),
            f"{cell.errors}/{cell.sent}" + ("*" if cell.time_limited else ""),
            str(cell.intra_op_threads or "-"), ms(cell.bare_p50_ms),
            f"{ratio:.2f}" if ratio else "-", ms(cell.preprocess_p50_ms),
            ms(cell.server_cpu_ms_per_request), cell.protocol)


def versus_row(comparison: Comparison) -> tuple[str, ...]:
    return (comparison.model, str(comparison.concurrency), f"{comparison.throughput_ratio:.2f}",
            ms(comparison.service_p99_ms), ms(comparison.baseline_p99_ms))


def grpc_vs_rest_row(row: GrpcVsRest) -> tuple[str, ...]:
    def ratio(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    return (row.model, str(row.concurrency), ms(row.rest_cpu_ms_per_request),
            ms(row.grpc_cpu_ms_per_request), ratio(row.cpu_ratio), f"{row.rest_requests_per_s:.1f}",
            f"{row.grpc_requests_per_s:.1f}", ratio(row.throughput_ratio))


def format_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    """Names left-aligned in the first two columns, numbers right-aligned after them."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(row: tuple[str, ...]) -> str:
        return "  ".join(v.ljust(w) if i < 2 else v.rjust(w) for i, (v, w) in enumerate(zip(row, widths, strict=True)))

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *map(line, rows)])


def clients(count: int) -> str:
    return f"{count} client" + ("s" if count > 1 else "")


def write_chart(cells: list[Cell], path: Path) -> None:
    """Throughput of every server and concurrency beside median latency at the lowest
    concurrency, with bare `session.run` as the floor, one group of bars per model."""
    import matplotlib  # an optional dependency (the `bench` extra), imported where it is used

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(c.model for c in cells))
    figure, (throughput, latency) = plt.subplots(1, 2, figsize=(max(8, 2.2 * len(models) + 4), 4.5))
    _bars(throughput, "Throughput", "requests/s", models, throughput_series(cells, models))
    _bars(latency, "Median latency", "p50 ms", models, latency_series(cells, models))
    figure.tight_layout()
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)


@dataclass(frozen=True)
class Series:
    label: str
    values: list[float]  # one a model
    hatched: bool = False


def sender(cell: Cell) -> str:
    """The server, and the protocol where it is not /predict: one bar colour each."""
    return cell.server if cell.protocol == "predict" else f"{cell.server} {cell.protocol}"


def throughput_series(cells: list[Cell], models: list[str]) -> list[Series]:
    by_key = {(sender(c), c.concurrency, c.model): c for c in cells}
    return [Series(f"{name}, {clients(concurrency)}",
                   [getattr(by_key.get((name, concurrency, m)), "requests_per_s", 0.0) for m in models],
                   hatched=name == "baseline")
            for name, concurrency in dict.fromkeys((sender(c), c.concurrency) for c in cells)]


def latency_series(cells: list[Cell], models: list[str]) -> list[Series]:
    """Per server: bare `session.run` with that server's threads, then the server's p50 (per
    protocol)."""
    lowest = min(c.concurrency for c in cells)
    by_key = {(sender(c), c.model): c for c in cells if c.concurrency == lowest}
    series = []
    for server in dict.fromkeys(c.server for c in cells):
        names = list(dict.fromkeys(sender(c) for c in cells if c.server == server))
        any_cells = [by_key.get((names[0], m)) for m in models]
        threads = next((c.intra_op_threads for c in any_cells if c), None)
        series.append(Series(f"bare session.run, {threads} thread" + ("s" if threads != 1 else ""),
                             [(c and c.bare_p50_ms) or 0.0 for c in any_cells]))
        for name in names:
            lowest_cells = [by_key.get((name, m)) for m in models]
            series.append(Series(f"{name}, {clients(lowest)}", [(c and c.p50_ms) or 0.0 for c in lowest_cells]))
    return series


def _bars(axes, title: str, ylabel: str, models: list[str], series: list[Series]) -> None:
    width = 0.8 / max(len(series), 1)
    positions = np.arange(len(models))
    for i, one in enumerate(series):
        axes.bar(positions + i * width, one.values, width, label=one.label,
                 hatch="//" if one.hatched else None)
    axes.set_title(title)
    axes.set_ylabel(ylabel)
    axes.set_xticks(positions + width * (len(series) - 1) / 2, models, rotation=30, ha="right")
    axes.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.3), ncols=2)


@dataclass(frozen=True)
class ServerSummary:
    name: str
    url: str
    started_here: bool
    intra_op_threads: int | None
    model_threads: dict[str, int]  # where a lone inference's threads differ by model
    ready_s: float | None  # from process start to /health/ready answering 200
    rss_ready_mb: float | None  # every model loaded, before any request
    rss_mb: float | None  # right after the last cell
    rss_settled_mb: float | None  # after a while without requests


@dataclass(frozen=True)
class Results:
    """A bench run, as written to bench.json."""

    created_utc: str
    machine: dict
    image: dict
    settings: dict
    bare_session_run: list[BareRun]
    servers: list[ServerSummary]
    cells: list[Cell]
    service_vs_baseline: list[Comparison]
    tradeoff: list[TradeoffPoint] = field(default_factory=list)  # one point per served model
    grpc_vs_rest: list[GrpcVsRest] = field(default_factory=list)


def text(results: Results, settle_s: float) -> str:
    cells = results.cells
    lines = [format_table(COLUMNS, [table_row(c) for c in cells])]
    if any(c.time_limited for c in cells):
        lines.append("* stopped by --time-limit before all --requests were sent")
    if results.service_vs_baseline:
        lines += ["", format_table(VERSUS_COLUMNS, [versus_row(v) for v in results.service_vs_baseline])]
    if results.grpc_vs_rest:
        lines += ["", "The Open Inference Protocol, the photo as BYTES: gRPC against REST "
                      "(server CPU per request, warm-up included):",
                  format_table(GRPC_VS_REST_COLUMNS, [grpc_vs_rest_row(r) for r in results.grpc_vs_rest])]
    if results.tradeoff:
        lines += ["", "The trade-off, one point per served model (tradeoff.png):",
                  format_table(TRADEOFF_COLUMNS, [tradeoff_row(p) for p in results.tradeoff])]
    lines.append("")
    for server in results.servers:
        if server.started_here:
            lines.append(f"{server.name}: ready {ms(server.ready_s)} s after start; RSS "
                         f"{ms(server.rss_ready_mb)} MB when ready, {ms(server.rss_mb)} MB "
                         f"after the run, {ms(server.rss_settled_mb)} MB {settle_s:.0f} s later")
    client_cpu = [c.client_cpu_ms_per_request for c in cells]
    lines.append(f"load generator CPU: {np.median(client_cpu):.3f} ms per request "
                 f"(median over cells, max {max(client_cpu):.3f})")
    return "\n".join(lines)
