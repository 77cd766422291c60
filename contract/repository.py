"""Reading and writing model folders of the repository described in docs/model-repository.md.

A model is a folder with a metadata.json. Anything wrong with one model (bad metadata, missing
file, hash or size mismatch, wrong label count) makes that model fail, never the repository.
"""
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from contract.metadata import METADATA_FILE, ModelMetadata


class RepositoryNotFound(Exception):
    """The model repository is not a folder."""


class ModelLoadError(Exception):
    """A model folder that cannot be served; the message says why."""


@dataclass(frozen=True)
class ModelFolder:
    """One folder of the repository; `metadata` is None, and `error` says why, when it could not be read."""

    name: str
    path: Path
    metadata: ModelMetadata | None = None
    error: str | None = None

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
        try:
            folders.append(ModelFolder(path.name, path, metadata=read_metadata(path)))
        except ModelLoadError as exc:
            folders.append(ModelFolder(path.name, path, error=str(exc)))
    return folders


def read_metadata(path: Path) -> ModelMetadata:
    """The metadata.json of the model folder `path`, which must be named after the model."""
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


def write_metadata(folder: Path, metadata: ModelMetadata) -> None:
    # json.dumps rather than pydantic's JSON: it writes floats and non-ASCII text as earlier exports did.
    text = json.dumps(metadata.model_dump(mode="json"), indent=2) + "\n"
    (folder / METADATA_FILE).write_text(text, encoding="utf-8")


def verify(folder: ModelFolder) -> list[str]:
    """Check the ONNX file against the recorded size and sha256; return the labels."""
    if folder.metadata is None:
        raise ModelLoadError(folder.error or "no metadata")
    meta = folder.metadata
    model_file = folder.model_file
    if not model_file.is_file():
        raise ModelLoadError(f"model file {meta.model_file!r} is missing")
    size = model_file.stat().st_size
    if size != meta.onnx.size_bytes:
        raise ModelLoadError(f"{meta.model_file} is {size} bytes, metadata says {meta.onnx.size_bytes}")
    digest = sha256_of(model_file)
    if digest != meta.onnx.sha256.lower():
        raise ModelLoadError(f"{meta.model_file} sha256 {digest} differs from metadata {meta.onnx.sha256}")
    return read_labels(folder.path / meta.labels.file, meta.labels.count)


def read_labels(path: Path, count: int) -> list[str]:
    """The class names in `path`, one a line; there must be `count` of them."""
    try:
        labels = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ModelLoadError(f"cannot read labels: {exc}") from exc
    if len(labels) != count:
        raise ModelLoadError(f"{path.name} has {len(labels)} labels, metadata says {count}")
    return labels


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file, read in chunks so a large checkpoint is never wholly in memory."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
