"""Triton's model-configuration and statistics extensions as data: the JSON shapes of Triton's REST
answers (`GET /v2/models/{name}/config`, `GET /v2/models[/{name}]/stats`), which the REST router
(extensions.py) returns as they are and the gRPC servicer parses into Triton's messages, so
perf_analyzer-style tools and dashboards read the same numbers over either protocol.

Statistics count predictions since start, over both protocols: `success` and `fail` requests,
`queue`, `compute_input` (decode and preprocess), `compute_infer` (inference) summed over the
successful ones; `inference_count` images inferred and `execution_count` session runs, by batch
size in `batch_stats` (counts only: a run's own time is not measured apart from its requests').
"""
from service.dataplane import DataPlane
from service.engine import ServedModel
from service.errors import UnknownModel
from service.metrics import ModelTotals
from service.protocols.open_inference.codec import DATATYPES, PLATFORM

CONFIG_TYPES = {"FP32": "TYPE_FP32", "BYTES": "TYPE_STRING"}
NS_PER_MS = 1_000_000


def model_config(served: ServedModel, max_batch_size: int) -> dict:
    """Triton's config of a model whose inputs and outputs batch along their first dimension:
    `dims` leave that dimension out, `max_batch_size` bounds it (MAX_IMAGES_PER_REQUEST)."""
    meta = served.metadata

    def tensor(spec) -> dict:
        return {"name": spec.name, "data_type": CONFIG_TYPES[DATATYPES[spec.dtype]],
                "dims": [-1 if d is None else d for d in spec.shape[1:]]}

    return {"name": served.name, "platform": PLATFORM, "backend": "onnxruntime",
            "max_batch_size": max_batch_size, "input": [tensor(meta.input)],
            "output": [tensor(meta.output)]}


def model_statistics(plane: DataPlane, name: str | None, version: str | None) -> dict:
    """Every model's statistics, or the named one's (UnknownModel if none is so named). Counted per
    model over its versions; `version` only names them in the answer."""
    names = sorted(plane.engine.models)
    if name is not None and name not in plane.engine.models:
        raise UnknownModel(name, names)
    return {"model_stats": [_statistics(model, version or "", plane.metrics.totals(model))
                            for model in ([name] if name else names)]}


def _statistics(model: str, version: str, totals: ModelTotals) -> dict:
    stage = totals.stage_ms

    def duration(count: int, *stages: str) -> dict:
        return {"count": count, "ns": round(sum(stage.get(s, 0.0) for s in stages) * NS_PER_MS)}

    ok = totals.succeeded
    return {"name": model, "version": version,
            "last_inference": round(totals.last_inference * 1000) if totals.last_inference else 0,
            "inference_count": sum(size * n for size, n in totals.batch_sizes.items()),
            "execution_count": sum(totals.batch_sizes.values()),
            "inference_stats": {"success": duration(ok, "total"),
                                "fail": duration(totals.failed),
                                "queue": duration(ok, "queue"),
                                "compute_input": duration(ok, "decode", "preprocess"),
                                "compute_infer": duration(ok, "inference"),
                                "compute_output": duration(ok)},
            "batch_stats": [{"batch_size": size, "compute_infer": {"count": n, "ns": 0}}
                            for size, n in sorted(totals.batch_sizes.items())]}
