"""Reading and writing model folders of the repository described in docs/model-repository.md.

A model is a folder with a metadata.json (version 1 of that model), or a folder of numbered
version folders `<name>/<N>/`, each a complete model folder whose metadata names `<name>`. Both
layouts may sit side by side in one repository. Anything wrong with one version (bad metadata,
missing file, hash or size mismatch, wrong label count) makes that version fail, never the
repository; every reason names the check that failed.
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


class IncompleteModel(ModelLoadError):
    """A model file missing or shorter than its metadata says: perhaps still being copied in."""


@dataclass(frozen=True)
class ModelFolder:
    """One folder of the repository; `metadata` is None, and `error` says why, when it could not be read."""

    name: str
    path: Path
    metadata: ModelMetadata | None = None
    error: str | None = None
    version: str = "1"  # the version folder's name; a folder without version folders is version 1

    @property
    def model_file(self) -> Path:
        assert self.metadata is not None
        return self.path / self.metadata.model_file


def discover(repository: Path) -> list[ModelFolder]:
    """Every version of every model: a sub-folder holding a metadata.json (version 1), or the
    version folders of one holding none, each with its metadata parsed (or the reason it failed)."""
    if not repository.is_dir():
        raise RepositoryNotFound(f"model repository {str(repository)!r} is not a folder "
                                 "(set MODEL_REPOSITORY)")
    folders = []
    # A hidden folder is one being written (the exporter's staging folders): not a model yet.
    for path in sorted(p for p in repository.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if (path / METADATA_FILE).is_file():
            folders.append(read_folder(path.name, path, "1"))
        else:
            folders += [read_folder(path.name, version, version.name) for version in sorted(
                (v for v in path.iterdir() if (v / METADATA_FILE).is_file()), key=version_order)]
    return folders


def version_order(path: Path) -> tuple[int, str]:
    """Numbered folders in numeric order; any other name first, where it is never the newest."""
    return (int(path.name), "") if path.name.isdecimal() else (-1, path.name)


def read_folder(name: str, path: Path, version: str) -> ModelFolder:
    """Version `version` of model `name`, held in `path`, or the reason it cannot be read."""
    if not version.isdecimal() or int(version) < 1:
        return ModelFolder(name, path, version=version,
                           error=f"version folder check: {version!r} is not a version number (1, 2, ...)")
    try:
        return ModelFolder(name, path, metadata=read_metadata(path, name), version=str(int(version)))
    except ModelLoadError as exc:
        return ModelFolder(name, path, error=str(exc), version=str(int(version)))


def read_metadata(path: Path, name: str | None = None) -> ModelMetadata:
    """The metadata.json of the model folder `path`, which must be named after the model (`name`,
    for a version folder; the folder's own name otherwise)."""
    try:
        metadata = ModelMetadata.model_validate(json.loads((path / METADATA_FILE).read_bytes()))
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"cannot read {METADATA_FILE}: {exc}") from exc
    except ValidationError as exc:
        raise ModelLoadError(f"invalid {METADATA_FILE}: {exc.error_count()} problem(s): "
                             + "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}"
                                         for e in exc.errors())) from exc
    name = name or path.name
    if metadata.name != name:
        raise ModelLoadError(f"name check: metadata name {metadata.name!r} differs from model folder "
                             f"name {name!r}")
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
        raise IncompleteModel(f"file check: model file {meta.model_file!r} is missing")
    size = model_file.stat().st_size
    if size != meta.onnx.size_bytes:
        kind = IncompleteModel if size < meta.onnx.size_bytes else ModelLoadError
        raise kind(f"size check: {meta.model_file} is {size} bytes, metadata says {meta.onnx.size_bytes}")
    digest = sha256_of(model_file)
    if digest != meta.onnx.sha256.lower():
        raise ModelLoadError(f"sha256 check: {meta.model_file} sha256 {digest} differs from metadata "
                             f"{meta.onnx.sha256}")
    return read_labels(folder.path / meta.labels.file, meta.labels.count)


def read_labels(path: Path, count: int) -> list[str]:
    """The class names in `path`, one a line; there must be `count` of them."""
    try:
        labels = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ModelLoadError(f"cannot read labels: {exc}") from exc
    if len(labels) != count:
        raise ModelLoadError(f"labels check: {path.name} has {len(labels)} labels, metadata says {count}")
    return labels


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file, read in chunks so a large checkpoint is never wholly in memory."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fingerprint(folder: ModelFolder) -> tuple[tuple[int, int], ...]:
    """Size and modification time of the folder's metadata and model files: a version whose
    fingerprint changed is read again; one whose did not is not retried after failing."""
    files = [folder.path / METADATA_FILE] + ([folder.model_file] if folder.metadata else [])
    stats = []
    for file in files:
        try:
            stat = file.stat()
            stats.append((stat.st_size, stat.st_mtime_ns))
        except OSError:
            stats.append((-1, -1))
    return tuple(stats)
