"""Reads the model repository described in docs/model-repository.md. Knows nothing of HTTP or ONNX.

A model is a folder with a metadata.json. Anything wrong with one model (bad metadata, missing
file, hash or size mismatch, wrong label count) makes that model `failed`, never the repository.
"""
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from service.preprocess import Preprocessing

METADATA_FILE = "metadata.json"


class RepositoryNotFound(Exception):
    pass


class ModelLoadError(Exception):
    """A model folder that cannot be served; the message says why."""


class Paper(BaseModel):
    title: str
    authors: str | None = None
    year: int | None = None
    url: str | None = None


class OnnxFile(BaseModel):
    opset: int
    size_bytes: int
    sha256: str


class InputSpec(BaseModel):
    name: str
    dtype: Literal["float32"]
    layout: Literal["NCHW"]
    shape: list[int | None]


class OutputSpec(BaseModel):
    name: str
    dtype: Literal["float32"]
    shape: list[int | None]
    kind: Literal["logits", "probabilities"]


class Labels(BaseModel):
    file: str
    set: str
    count: int = Field(gt=0)


class Weights(BaseModel):
    kind: Literal["random", "imagenet", "custom"]
    source: str | None = None
    sha256: str | None = None
    note: str | None = None


class ModelMetadata(BaseModel):
    """metadata.json, version 1. Unknown extra fields are kept and reported as they stand."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())

    schema_version: Literal[1]
    name: str
    architecture: str
    paper: Paper | None = None
    model_file: str
    optimized_model_file: str | None = None
    onnx: OnnxFile
    input: InputSpec
    output: OutputSpec
    preprocessing: Preprocessing
    labels: Labels
    params: int | None = None
    macs: int | None = None
    weights: Weights
    export: dict[str, Any] = {}


@dataclass
class ModelFolder:
    """One folder of the repository; `metadata` is None when metadata.json could not be read."""

    name: str
    path: Path
    metadata: ModelMetadata | None = None
    error: str | None = None
    labels: list[str] = field(default_factory=list)

    @property
    def model_file(self) -> Path:
        assert self.metadata is not None
        return self.path / self.metadata.model_file


def discover(repository: Path) -> list[ModelFolder]:
    """Every sub-folder holding a metadata.json, with its metadata parsed (or the reason it failed)."""
    if not repository.is_dir():
        raise RepositoryNotFound(f"model repository {str(repository)!r} is not a folder "
                                 "(set MODEL_REPOSITORY)")
    folders = []
    for path in sorted(p for p in repository.iterdir() if (p / METADATA_FILE).is_file()):
        folder = ModelFolder(name=path.name, path=path)
        try:
            folder.metadata = read_metadata(path)
        except ModelLoadError as exc:
            folder.error = str(exc)
        folders.append(folder)
    return folders


def read_metadata(path: Path) -> ModelMetadata:
    try:
        metadata = ModelMetadata.model_validate(json.loads((path / METADATA_FILE).read_bytes()))
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"cannot read {METADATA_FILE}: {exc}") from exc
    except ValidationError as exc:
        raise ModelLoadError(f"invalid {METADATA_FILE}: {exc.error_count()} problem(s): "
                             + "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}"
                                         for e in exc.errors())) from exc
    if metadata.name != path.name:
        raise ModelLoadError(f"metadata name {metadata.name!r} differs from folder name {path.name!r}")
    return metadata


def verify(folder: ModelFolder) -> None:
    """Check the ONNX file against the recorded size and sha256, and load the labels."""
    if folder.metadata is None:
        raise ModelLoadError(folder.error or "no metadata")
    meta = folder.metadata
    model_file = folder.model_file
    if not model_file.is_file():
        raise ModelLoadError(f"model file {meta.model_file!r} is missing")
    size = model_file.stat().st_size
    if size != meta.onnx.size_bytes:
        raise ModelLoadError(f"{meta.model_file} is {size} bytes, metadata says {meta.onnx.size_bytes}")
    digest = _sha256(model_file)
    if digest != meta.onnx.sha256.lower():
        raise ModelLoadError(f"{meta.model_file} sha256 {digest} differs from metadata {meta.onnx.sha256}")
    folder.labels = read_labels(folder.path / meta.labels.file, meta.labels.count)


def read_labels(path: Path, count: int) -> list[str]:
    try:
        labels = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ModelLoadError(f"cannot read labels: {exc}") from exc
    if len(labels) != count:
        raise ModelLoadError(f"{path.name} has {len(labels)} labels, metadata says {count}")
    return labels


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
