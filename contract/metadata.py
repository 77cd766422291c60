"""The pydantic models of metadata.json, version 2 (docs/model-repository.md).

Version 2 added what lets weights carry their own preprocessing (`resize_rule`, `antialias`) and
which implementation's layout a network follows (`layout`); every new field defaults to version
1's behaviour, so a version-1 file reads and is served as before.
"""
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, model_validator

SCHEMA_VERSION = 2
ReadableSchemaVersion = Literal[1, 2]
READABLE_SCHEMA_VERSIONS = get_args(ReadableSchemaVersion)
METADATA_FILE = "metadata.json"
MODEL_FILE = "model.onnx"
LABELS_FILE = "labels.txt"
RANDOM_WEIGHTS_NOTE = "Random weights: predictions are meaningless."

ModelStatus = Literal["loading", "ready", "failed", "unavailable"]
WeightsKind = Literal["random", "imagenet", "custom"]
ResizeRule = Literal["shorter_side", "shorter_side_rounded", "squash"]
Layout = Literal["paper", "keras", "megvii"]


class Preprocessing(BaseModel):
    """How an image becomes the input tensor: whatever the model's weights were trained with.

    The defaults are torchvision's Resize, CenterCrop, ToTensor, Normalize (version 1's only rule).
    """

    model_config = ConfigDict(frozen=True)  # declared once per model, shared by reference

    resize: PositiveInt = Field(description="Length of the shorter side after resizing, in pixels "
                                            "(`squash`: of both sides).")
    resize_rule: ResizeRule = Field(
        "shorter_side", description="`shorter_side`: the shorter side becomes `resize`, the longer "
        "`int(resize * long / short)` (torchvision); `shorter_side_rounded`: the same with the longer "
        "side rounded to the nearest pixel, `int(resize * long / short + 0.5)` (megvii's OpenCV resize); "
        "`squash`: both sides become `resize`, the aspect ratio is not kept (TensorFlow's central "
        "crop then resize). A centre crop of `crop` x `crop` follows each.")
    interpolation: Literal["nearest", "bilinear", "bicubic"] = Field(
        "bilinear", description="Resampling filter of the resize (PIL's filter of that name).")
    antialias: bool = Field(
        True, description="true: the filter widens when shrinking, so every source pixel counts (PIL's "
        "resize, torchvision's antialias=True); false (bilinear only): each output pixel interpolates "
        "between the four source pixels around its centre (OpenCV's INTER_LINEAR).")
    crop: PositiveInt = Field(description="Side of the square centre crop taken after resizing; at most `resize`.")
    color: Literal["RGB", "BGR"] = Field("RGB", description="Channel order of the input tensor.")
    scale: PositiveFloat = Field(255.0, description="8-bit pixel values are divided by this before "
                                                    "normalising: 255 gives 0-1, 1 keeps 0-255.")
    mean: tuple[float, float, float] = Field(description="Per-channel mean subtracted after scaling.")
    std: tuple[PositiveFloat, PositiveFloat, PositiveFloat] = Field(
        description="Per-channel standard deviation divided by after subtracting the mean.")

    @model_validator(mode="after")
    def _crop_fits(self) -> "Preprocessing":
        if self.crop > self.resize:
            raise ValueError(f"crop {self.crop} is larger than resize {self.resize}")
        return self

    @model_validator(mode="after")
    def _unfiltered_is_bilinear(self) -> "Preprocessing":
        if not self.antialias and self.interpolation != "bilinear":
            raise ValueError(f"antialias false is defined for bilinear interpolation only, not {self.interpolation}")
        return self

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """An image's (width, height) after `resize_rule`, before the centre crop."""
        if self.resize_rule == "squash":
            return self.resize, self.resize
        short = min(width, height)
        long = max(width, height)
        # torchvision truncates the longer side; megvii's OpenCV resize rounds it.
        new_long = int(self.resize * long / short + (0.5 if self.resize_rule == "shorter_side_rounded" else 0))
        return (self.resize, new_long) if width <= height else (new_long, self.resize)

    def describe(self) -> str:
        """One line for people, e.g. for `GET /models`."""
        if len(set(self.mean)) == 1 and len(set(self.std)) == 1:
            low, high = ((level / self.scale - self.mean[0]) / self.std[0] for level in (0, 255))
            values = f"values {low:g} to {high:g}"
        else:
            values = f"values 0 to {255 / self.scale:g} normalised by mean {list(self.mean)}, std {list(self.std)}"
        resize = {"shorter_side": f"shorter side to {self.resize}",
                  "shorter_side_rounded": f"shorter side to {self.resize} (longer side rounded)",
                  "squash": f"squashed to {self.resize}x{self.resize}"}[self.resize_rule]
        filtering = "" if self.antialias else " without antialiasing"
        return (f"{self.color}, {values}; {resize}, {self.interpolation}{filtering}; "
                f"centre crop {self.crop}x{self.crop}")


class Paper(BaseModel):
    model_config = ConfigDict(frozen=True)

    title: str = Field(description="Title of the paper that introduced the architecture.")
    authors: str | None = Field(None, description="Authors, e.g. 'Howard et al.'.")
    year: int | None = Field(None, description="Year of publication.")
    url: str | None = Field(None, description="Where to read the paper.")


class OnnxFile(BaseModel):
    opset: int = Field(description="ONNX opset the graph was exported with.")
    size_bytes: int = Field(description="Size of `model_file`; checked when the model is loaded.")
    sha256: str = Field(description="Hex sha256 of `model_file`; checked when the model is loaded.")


class InputSpec(BaseModel):
    name: str = Field(description="Name of the graph's single input tensor.")
    dtype: Literal["float32"] = Field(description="Element type of the input tensor.")
    layout: Literal["NCHW"] = Field(description="Axis order of the input tensor.")
    shape: list[int | None] = Field(description="Input shape; null marks the dynamic batch axis.")


class OutputSpec(BaseModel):
    name: str = Field(description="Name of the graph's single output tensor.")
    dtype: Literal["float32"] = Field(description="Element type of the output tensor.")
    shape: list[int | None] = Field(description="Output shape; null marks the dynamic batch axis.")
    kind: Literal["logits", "probabilities"] = Field(
        description="What the output holds; softmax turns logits into probabilities.")


class Labels(BaseModel):
    file: str = Field(description="Class-name file relative to the model folder: UTF-8, line i names class i.")
    set: str = Field(description="Name of the label set, e.g. 'imagenet-1k'.")
    count: int = Field(gt=0, description="Number of lines in `file`; equals the number of output classes.")


class Weights(BaseModel):
    kind: WeightsKind = Field(description="Where the weights came from.")
    source: str | None = Field(None, description="The seed, checkpoint URL or file the weights came from.")
    sha256: str | None = Field(None, description="Hex sha256 of the checkpoint file, if there was one.")
    sha256_verified: bool | None = Field(
        None, description="Whether `sha256` was checked against a hash known before the download: "
                          "torchvision's file names carry one; Keras publishes none, so its files are "
                          "checked only when the user pins a hash. null when there was no file.")
    note: str | None = Field(None, description="Says plainly when predictions are meaningless, or when "
                                               "a downloaded file could not be verified.")

    @property
    def shown_note(self) -> str | None:
        """The note to show a person: the recorded one, or the standard one for random weights."""
        return self.note or (RANDOM_WEIGHTS_NOTE if self.kind == "random" else None)


class CalibrationSet(BaseModel):
    photos: list[str] = Field(description="File names of the photos the activation ranges were measured on.")
    method: str = Field(description="How the ranges were set from them (onnxruntime's calibration method).")


class Drift(BaseModel):
    """How far the INT8 model's answers are from the FP32 model's, on photos kept out of calibration."""

    photos: list[str] = Field(description="File names of the held-out photos.")
    top1_agreement: float = Field(ge=0, le=1, description="Share of the photos whose top-1 class is the FP32 one.")
    top5_overlap: float = Field(ge=0, le=1, description="Mean share of the FP32 top-5 classes also in the INT8 top-5.")
    logit_cosine_mean: float = Field(description="Mean cosine similarity of the INT8 and FP32 logit vectors.")
    logit_cosine_min: float = Field(description="Lowest cosine similarity over the photos.")


class Quantization(BaseModel):
    """How an INT8 model was made from the FP32 one, and how much its answers moved."""

    precision: Literal["int8"] = Field(description="Precision of the quantized weights and activations.")
    method: str = Field(description="The tool and scheme, e.g. static post-training quantization, QDQ.")
    per_channel: bool = Field(description="Weights quantized per output channel (else per tensor).")
    activations: Literal["uint8", "int8"] = Field(description="Element type of the quantized activations.")
    weights: Literal["int8", "uint8"] = Field(description="Element type of the quantized weights.")
    fp32_size_bytes: int = Field(description="Size of the FP32 ONNX file the INT8 one was made from.")
    calibration: CalibrationSet = Field(description="The photos that set the activation ranges.")
    drift: Drift = Field(description="INT8 against FP32 on held-out photos, measured at export.")
    note: str | None = Field(None, description="Says plainly when the drift figures say little.")


class ModelMetadata(BaseModel):
    """metadata.json, version 2 (version 1 reads too). Unknown extra fields are kept and reported as they stand."""

    # protected_namespaces=(): `model_file` is a field here, not pydantic's `model_` namespace.
    model_config = ConfigDict(extra="allow", protected_namespaces=())

    schema_version: ReadableSchemaVersion = Field(description="Version of this format.")
    name: str = Field(description="The model's URL name; equals its folder name.")
    architecture: str = Field(description="Human name of the network, e.g. 'MobileNetV3-Large 1.0'.")
    layout: Layout = Field(
        "paper", description="Whose reading of the architecture the graph follows where implementations "
        "differ and the weights depend on it: `paper` (this project's, torchvision's where it has the "
        "network), `keras` (Keras's MobileNet: TensorFlow's SAME padding, BatchNorm eps 1e-3, ReLU6, "
        "1x1-conv classifier), `megvii` (megvii's ShuffleNetV1 code: shuffle after the depthwise conv, "
        "classifier without bias).")
    paper: Paper | None = Field(None, description="The paper that introduced the architecture.")
    model_file: str = Field(description="ONNX file relative to the model folder.")
    optimized_model_file: str | None = Field(
        None, description="Optional onnxruntime-optimized file relative to the folder, used only by the "
                          "onnxruntime version in `export.onnxruntime`.")
    onnx: OnnxFile = Field(description="What `model_file` is, to check it at load.")
    input: InputSpec = Field(description="The graph's single input.")
    output: OutputSpec = Field(description="The graph's single output.")
    preprocessing: Preprocessing = Field(description="How an image becomes the input tensor.")
    labels: Labels = Field(description="The class names.")
    params: int | None = Field(None, description="Number of parameters.")
    macs: int | None = Field(None, description="Multiply-accumulates for one image.")
    weights: Weights = Field(description="Where the weights came from.")
    export: dict[str, Any] = Field({}, description="Tool versions, time and the ONNX-vs-PyTorch parity check "
                                                   "of the export; reported as it stands.")
    quantization: Quantization | None = Field(
        None, description="Set when `model_file` is an INT8 model quantized from the FP32 export; null for FP32.")
