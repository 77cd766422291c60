"""The model repository's format, defined once: what `model_defs` writes and `service` reads.

A model repository is a folder of model folders, each holding metadata.json, model.onnx and
labels.txt (docs/model-repository.md). This package holds the pydantic models of metadata.json
and the functions that read, write and check a model folder. It imports only pydantic and the
standard library, so the exporter (PyTorch) and the service (onnxruntime) can both depend on it.
`python -m contract` prints the JSON schema of metadata.json.
"""
from contract.metadata import (
    LABELS_FILE,
    METADATA_FILE,
    MODEL_FILE,
    RANDOM_WEIGHTS_NOTE,
    SCHEMA_VERSION,
    CalibrationSet,
    Drift,
    InputSpec,
    Labels,
    Layout,
    ModelMetadata,
    ModelStatus,
    OnnxFile,
    OutputSpec,
    Paper,
    Preprocessing,
    Quantization,
    ResizeRule,
    Weights,
    WeightsKind,
)
from contract.repository import (
    IncompleteModel,
    ModelFolder,
    ModelLoadError,
    RepositoryNotFound,
    discover,
    fingerprint,
    read_labels,
    read_metadata,
    sha256_of,
    verify,
    write_metadata,
)

__all__ = [
    "SCHEMA_VERSION", "METADATA_FILE", "MODEL_FILE", "LABELS_FILE", "RANDOM_WEIGHTS_NOTE",
    "ModelStatus", "WeightsKind", "ResizeRule", "Layout",
    "Preprocessing", "Paper", "OnnxFile", "InputSpec", "OutputSpec", "Labels", "Weights", "ModelMetadata",
    "CalibrationSet", "Drift", "Quantization",
    "RepositoryNotFound", "ModelLoadError", "IncompleteModel", "ModelFolder",
    "discover", "fingerprint", "read_metadata", "write_metadata", "verify", "read_labels", "sha256_of",
]
