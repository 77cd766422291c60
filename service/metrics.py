"""The one place that records every timing: Prometheus series and the human latency comparison.

Both views come from the same `observe_request` call: the Prometheus histograms for scraping and
aggregation, and a window of the most recent per-stage timings per model for exact percentiles
as JSON or a terminal table. Each app gets its own registry, so several apps can live in a process.
"""
import contextlib
import math
import os
import threading
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, ProcessCollector, generate_latest
from prometheus_client.openmetrics import exposition as openmetrics

STAGES = ("load", "read", "decode", "preprocess", "queue", "inference", "total")  # load: on demand only
LOAD_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# Seconds, as Prometheus names them; dense between 1 and 500 ms where these CNNs on CPU live.
LATENCY_BUCKETS = (0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075,
                   0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
UNKNOWN_MODEL = "_unknown"  # label for requests naming no served model, so labels stay bounded
COMPARISON = "_compare"  # label of /compare requests: their shared read, decode and preprocessing
# The statuses the alert rules (deploy/prometheus/alerts.yml) divide by.
ALERTED_STATUSES = ("200", "500", "503", "504")
PROTOCOLS = ("http", "grpc")  # what carried a prediction: /predict and REST OIP, or gRPC OIP
# Where a container's memory limit is read: cgroup v2, then v1 (which writes "none" as about 2**63).
CGROUP_MEMORY_LIMITS = (Path("/sys/fs/cgroup/memory.max"),
                        Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"))
NO_MEMORY_LIMIT_ABOVE = 2 ** 60


@dataclass
class _ModelStats:
    window: int
    first: float | None = None
    last: float | None = None
    statuses: dict[int, int] = field(default_factory=dict)
    batch_sizes: dict[int, int] = field(default_factory=dict)  # session.run calls per batch size
    stages: dict[str, deque] = field(default_factory=dict)
    totals: "ModelTotals" = field(default_factory=lambda: ModelTotals())

    def __post_init__(self) -> None:
        self.stages = {stage: deque(maxlen=self.window) for stage in STAGES}


@dataclass
class ModelTotals:
    """Since start: what Triton's statistics extension reports (service/protocols/open_inference/
    statistics.py), kept apart from the window, which forgets."""

    succeeded: int = 0
    failed: int = 0
    last_inference: float | None = None  # wall-clock seconds of the last successful prediction
    stage_ms: dict[str, float] = field(default_factory=dict)  # summed over successful predictions
    batch_sizes: dict[int, int] = field(default_factory=dict)  # session.run calls per batch size (since start)


class Metrics:
    def __init__(self, window: int = 10_000) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)  # process_resident_memory_bytes, CPU seconds
        self.stage_seconds = Histogram(
            "cnn_serve_stage_duration_seconds", "Time per request stage (decode, preprocess, queue, "
            "inference, total) of successful predictions", ["model", "stage"],
            buckets=LATENCY_BUCKETS, registry=self.registry)
        self.requests = Counter("cnn_serve_requests", "Prediction requests by model, HTTP status "
                                "(a gRPC answer counts as the HTTP status of its error) and protocol",
                                ["model", "status", "protocol"], registry=self.registry)
        self.in_flight = Gauge("cnn_serve_requests_in_flight", "Requests being handled now",
                               registry=self.registry)
        self.batch_size = Histogram("cnn_serve_batch_size", "Realised batch size per session.run",
                                    ["model"], buckets=BATCH_BUCKETS, registry=self.registry)
        self.model_info = Info("cnn_serve_model", "Served model and its state", ["model"],
                               registry=self.registry)
        self.model_startup_seconds = Gauge("cnn_serve_model_startup_seconds",
                                           "Session creation (load) and warm-up time",
                                           ["model", "phase"], registry=self.registry)
        self.model_loads = Counter("cnn_serve_model_loads", "Loads of a model version by outcome "
                                   "(loaded, failed, incomplete)", ["model", "version", "outcome"],
                                   registry=self.registry)
        self.model_unloads = Counter("cnn_serve_model_unloads", "Model versions unloaded (by the API, "
                                     "a scan, a swap or MAX_LOADED_MODELS)", ["model", "version"],
                                     registry=self.registry)
        self.model_load_seconds = Histogram("cnn_serve_model_load_duration_seconds",
                                            "Time to verify, load and warm up a model version",
                                            ["model"], buckets=LOAD_BUCKETS, registry=self.registry)
        self.version_ready = Gauge("cnn_serve_model_version_ready", "1 while a model version serves",
                                   ["model", "version"], registry=self.registry)
        Gauge("cnn_serve_memory_limit_bytes", "Memory limit of the process's cgroup (a container's "
              "limit); +Inf without one", registry=self.registry).set(memory_limit_bytes())
        self._window = window
        self._stats: dict[str, _ModelStats] = {}
        self._lock = threading.Lock()

    def expect_models(self, models: Iterable[str]) -> None:
        """Create each model's series at zero before its first request: a series born at its first
        requests hides them from rate(), so a short burst never reaches a dashboard or an alert."""
        for model in models:
            for status in ALERTED_STATUSES:
                for protocol in PROTOCOLS:
                    self.requests.labels(model=model, status=status, protocol=protocol)
            for stage in STAGES:
                self.stage_seconds.labels(model=model, stage=stage)

    def observe_request(self, model: str, status: int, timings_ms: dict[str, float] | None,
                        trace_ids: tuple[str, str] | None = None, protocol: str = "http") -> None:
        """Record one finished prediction request; timings only for successful ones. A traced
        request's trace id becomes the exemplar of the buckets it lands in (OpenMetrics only)."""
        self.requests.labels(model=model, status=str(status), protocol=protocol).inc()
        now = time.monotonic()
        with self._lock:
            stats = self._stats.setdefault(model, _ModelStats(self._window))
            stats.statuses[status] = stats.statuses.get(status, 0) + 1
            if status < 400:  # throughput counts answered predictions, not refusals
                stats.first = stats.first or now
                stats.last = now
                stats.totals.succeeded += 1
                stats.totals.last_inference = time.time()
            else:
                stats.totals.failed += 1
            for stage, ms in (timings_ms or {}).items():
                stats.stages[stage].append(ms)
                stats.totals.stage_ms[stage] = stats.totals.stage_ms.get(stage, 0.0) + ms
        exemplar = {"trace_id": trace_ids[0], "span_id": trace_ids[1]} if trace_ids else None
        for stage, ms in (timings_ms or {}).items():
            self.stage_seconds.labels(model=model, stage=stage).observe(ms / 1000, exemplar)

    def observe_batch(self, model: str, size: int) -> None:
        self.batch_size.labels(model=model).observe(size)
        with self._lock:
            sizes = self._stats.setdefault(model, _ModelStats(self._window)).batch_sizes
            sizes[size] = sizes.get(size, 0) + 1

    def observe_model(self, model: str, info: dict[str, str], load_ms: float | None,
                      warmup_ms: float | None) -> None:
        self.model_info.labels(model=model).info(info)
        if load_ms is not None:
            self.model_startup_seconds.labels(model=model, phase="load").set(load_ms / 1000)
        if warmup_ms is not None:
            self.model_startup_seconds.labels(model=model, phase="warmup").set(warmup_ms / 1000)

    def totals(self, model: str) -> ModelTotals:
        """A copy of the model's counts since start (all zero before its first request)."""
        with self._lock:
            stats = self._stats.get(model)
            if stats is None:
                return ModelTotals()
            t = stats.totals
            return ModelTotals(t.succeeded, t.failed, t.last_inference, dict(t.stage_ms),
                               dict(stats.batch_sizes))

    def observe_load(self, model: str, version: str, seconds: float, outcome: str) -> None:
        self.model_loads.labels(model=model, version=version, outcome=outcome).inc()
        self.model_load_seconds.labels(model=model).observe(seconds)
        if outcome == "loaded":
            self.version_ready.labels(model=model, version=version).set(1)

    def observe_unload(self, model: str, version: str, why: str) -> None:
        self.model_unloads.labels(model=model, version=version).inc()
        self.version_ready.labels(model=model, version=version).set(0)

    def forget_version(self, model: str, version: str) -> None:
        """A version gone from the index (from the repository, or no longer chosen by VERSION_POLICY)
        leaves no series behind: poll mode sees a new version every release, and its 0 would stay."""
        with contextlib.suppress(KeyError):  # never loaded: it has no series
            self.version_ready.remove(model, version)

    def prometheus_text(self) -> bytes:
        return generate_latest(self.registry)

    def openmetrics_text(self) -> bytes:
        """The OpenMetrics exposition: the same series, with the latency buckets' exemplars."""
        return openmetrics.generate_latest(self.registry)

    def summary(self) -> dict:
        """Per model: requests, answers by status, throughput, realised batch sizes and
        mean/p50/p90/p95/p99 per stage in ms."""
        with self._lock:
            snapshot = {m: (s.first, s.last, dict(s.statuses),
                            dict(s.batch_sizes), {k: list(v) for k, v in s.stages.items()})
                        for m, s in sorted(self._stats.items())}
        models = {}
        for model, (first, last, statuses, batches, stages) in snapshot.items():
            requests = sum(statuses.values())
            errors = sum(n for code, n in statuses.items() if code >= 400)
            span = (last - first) if first is not None and last is not None else 0.0
            ok = requests - errors
            models[model] = {
                "requests": requests,
                "errors": errors,
                "statuses": {str(code): n for code, n in sorted(statuses.items())},
                "throughput_rps": round((ok - 1) / span, 2) if ok > 1 and span > 0 else None,
                "batch_sizes": {str(size): n for size, n in sorted(batches.items())},
                "stages_ms": {stage: _percentiles(values) for stage, values in stages.items() if values},
            }
        return {"window": self._window, "process_rss_bytes": process_rss_bytes(), "models": models}

    def table(self) -> str:
        """The summary as fixed-width text for a terminal."""
        header = (f"{'model':<22}{'requests':>9}{'errors':>7}{'req/s':>8}  {'stage':<11}"
                  f"{'mean':>8}{'p50':>8}{'p90':>8}{'p99':>8}  (ms)")
        lines = [header, "-" * len(header)]
        for model, s in self.summary()["models"].items():
            rps = f"{s['throughput_rps']:.1f}" if s["throughput_rps"] is not None else "-"
            lead = f"{model:<22}{s['requests']:>9}{s['errors']:>7}{rps:>8}  "
            if not s["stages_ms"]:
                lines.append(lead + "(no successful requests)")
            for i, (stage, p) in enumerate(s["stages_ms"].items()):
                lines.append((lead if i == 0 else " " * len(lead)) + f"{stage:<11}{p['mean']:>8.2f}"
                             f"{p['p50']:>8.2f}{p['p90']:>8.2f}{p['p99']:>8.2f}")
        return "\n".join(lines) + "\n"


def server_timing(timings_ms: dict[str, float]) -> str:
    """A Server-Timing header value, e.g. `queue;dur=0.05, inference;dur=4.10`."""
    return ", ".join(f"{stage};dur={ms:.2f}" for stage, ms in timings_ms.items())


def process_rss_bytes() -> int | None:
    try:  # Linux: resident pages are the second field of statm
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def memory_limit_bytes(files: Iterable[Path] = CGROUP_MEMORY_LIMITS) -> float:
    """The memory limit of the cgroup this process runs in (in a container, the container's);
    infinity where there is none or it cannot be read."""
    for path in files:
        try:
            value = path.read_text().strip()
        except OSError:
            continue
        return float(value) if value.isdigit() and int(value) < NO_MEMORY_LIMIT_ABOVE else math.inf
    return math.inf


def _percentiles(values: list[float]) -> dict[str, float]:
    array = np.asarray(values)
    p50, p90, p95, p99 = np.percentile(array, [50, 90, 95, 99])
    return {"count": len(values), "mean": round(float(array.mean()), 3), "p50": round(float(p50), 3),
            "p90": round(float(p90), 3), "p95": round(float(p95), 3), "p99": round(float(p99), 3)}
