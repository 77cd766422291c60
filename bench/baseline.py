"""The baseline the bench compares the service with: a plain FastAPI app, kept deliberately naive.

A `def` endpoint takes the multipart upload, preprocesses it with the service's own `preprocess`
and calls `session.run` with one intra-op thread; FastAPI runs it in its threadpool. This was the
best of the usual ways to serve these models on a small CPU machine, so the service is judged by
how far it gets past it.

    python -m bench.baseline --model-repository DIR [--models a,b] [--port 8001]

It answers `POST /predict/{model}` (form field `file`, query `top_k`) and `GET /health/ready`.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

import onnxruntime as ort
import uvicorn
from fastapi import FastAPI, File, HTTPException, UploadFile
from pydantic import BaseModel

from bench.bare import open_model
from contract import ModelMetadata
from service.postprocess import top_k as best_classes
from service.preprocess import preprocess
from service.settings import Settings

INTRA_OP_THREADS = 1  # with the threadpool running several requests at once, this used the cores best


@dataclass(frozen=True)
class Model:
    metadata: ModelMetadata
    session: ort.InferenceSession
    labels: list[str]


def load_model(model_dir: Path) -> Model:
    options = ort.SessionOptions()
    options.intra_op_num_threads = INTRA_OP_THREADS
    options.inter_op_num_threads = 1
    opened = open_model(model_dir, options)
    labels_file = model_dir / opened.metadata.labels.file
    return Model(opened.metadata, opened.session, labels_file.read_text(encoding="utf-8").splitlines())


class Prediction(BaseModel):
    label: str
    class_id: int
    probability: float


class PredictResponse(BaseModel):
    model: str
    predictions: list[Prediction]


def create_app(repository: Path, names: list[str] | None = None) -> FastAPI:
    folders = sorted(p.parent for p in repository.glob("*/metadata.json"))
    models = {d.name: load_model(d) for d in folders if names is None or d.name in names}
    max_pixels = Settings().max_image_pixels
    app = FastAPI(title="baseline")

    @app.get("/health/ready")
    def ready() -> dict:
        return {"ready": True, "models": sorted(models)}

    @app.post("/predict/{name}", response_model=PredictResponse)
    def predict(name: str, file: UploadFile = File(...), top_k: int = 5) -> PredictResponse:
        if name not in models:
            raise HTTPException(404, f"unknown model {name!r}")
        model = models[name]
        x = preprocess(file.file.read(), model.metadata.preprocessing, max_pixels)
        logits = model.session.run(None, {model.metadata.input.name: x})[0][0]
        return PredictResponse(
            model=name,
            predictions=[Prediction(label=model.labels[i], class_id=i, probability=p)
                         for i, p in best_classes(logits, model.metadata.output.kind, top_k)],
        )

    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.baseline", description=__doc__.split("\n")[0])
    parser.add_argument("--model-repository", type=Path, default=os.environ.get("MODEL_REPOSITORY"))
    parser.add_argument("--models", help="comma-separated model names (default: all)")
    parser.add_argument("--host", default=os.environ.get("HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8001")))
    args = parser.parse_args(argv)
    if args.model_repository is None:
        parser.error("--model-repository (or MODEL_REPOSITORY) is required")
    names = args.models.split(",") if args.models else None
    app = create_app(args.model_repository, names)
    # No access log: the baseline is measured at its best.
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
