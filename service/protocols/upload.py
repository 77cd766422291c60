"""One uploaded image, and what a model answers about it: the wire format `/predict/{model}` and
`/compare` share (routers never import each other).

The image comes in multipart field `file`, or as the raw body; each model's answer is its top-k
classes, its weights, the image's size and the stage timings, and with `input_image` the picture
the model saw.
"""
import base64
import io
from dataclasses import dataclass

from fastapi import Request, Response
from pydantic import BaseModel, Field

from contract import ModelMetadata, WeightsKind
from service.engine import ServedModel
from service.errors import MissingFileField, TooManyFiles, TopKOutOfRange, UnsupportedMediaType
from service.lifecycle import Inputs, Result
from service.postprocess import top_k as best_classes
from service.preprocess import to_picture
from service.protocols.multipart import form_parts

RAW_IMAGE_TYPES = ("", "application/octet-stream")
# Answer sizes, for holding an answer before it is built: its fixed fields (model, weights, image,
# timings) without the weights' note, one prediction without its label, and a PNG's chunks and
# deflate blocks beyond its raw rows.
ANSWER_BYTES = 2048
PREDICTION_BYTES = 96
PNG_OVERHEAD_BYTES = 1024
UPLOAD_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": {
        "file": {"type": "string", "format": "binary"}}}},
    "image/*": {"schema": {"type": "string", "format": "binary"}},
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}}


class Prediction(BaseModel):
    label: str
    class_id: int
    probability: float


class WeightsInfo(BaseModel):
    kind: WeightsKind
    source: str | None = None
    note: str | None = Field(None, description="Says plainly when predictions are meaningless.")


class ImageInfo(BaseModel):
    width: int = Field(description="Width of the upright image as uploaded (after EXIF rotation).")
    height: int
    format: str = Field(description="Format Pillow detected, e.g. JPEG, PNG.")


class Timings(BaseModel):
    """Milliseconds per stage of this request; `total` runs from the route's start to its end."""

    load: float | None = Field(None, exclude_if=lambda ms: ms is None,
                               description="Only when this request loaded the model "
                                           "(MAX_LOADED_MODELS had left it out); absent otherwise.")
    read: float = Field(description="Receiving the body. (Encoding the answer is in Server-Timing "
                                    "only: this body is what it encodes.)")
    decode: float
    preprocess: float
    queue: float = Field(description="Wait for a free inference worker.")
    inference: float
    total: float


class PredictResponse(BaseModel):
    model: str
    version: str = Field(description="The model version that answered.")
    weights: WeightsInfo
    predictions: list[Prediction]
    image: ImageInfo
    timings_ms: Timings
    input_image: str | None = Field(
        None, description="Only with ?input_image=true: what the model saw (resized, cropped, its "
                          "normalisation undone) as a PNG data URL.")


def weights_info(meta: ModelMetadata) -> WeightsInfo:
    weights = meta.weights
    return WeightsInfo(kind=weights.kind, source=weights.source, note=weights.shown_note)


@dataclass(frozen=True)
class PredictAdapter:
    top_k: int | None
    default_top_k: int
    input_image: bool = False
    parses_body = False

    async def read(self, request: Request) -> bytes:
        content_type = request.headers.get("content-type", "")
        media_type = content_type.split(";")[0].strip().lower()
        if media_type == "multipart/form-data":
            return _uploaded_file(await request.body(), content_type)
        if media_type in RAW_IMAGE_TYPES or media_type.startswith("image/"):
            return await request.body()
        raise UnsupportedMediaType(content_type)

    def decode(self, payload: bytes, model: ServedModel) -> Inputs:
        classes = model.metadata.labels.count
        if self.top_k is not None and not 1 <= self.top_k <= classes:
            raise TopKOutOfRange(self.top_k, classes)
        return Inputs(files=[payload], options=self.top_k or min(self.default_top_k, classes))

    def answer_bytes(self, inputs: Inputs, model: ServedModel) -> int:
        top_k: int = inputs.options
        note = model.metadata.weights.shown_note or ""
        crop = model.metadata.preprocessing.crop
        # The picture: a PNG at worst its raw rows (and a filter byte each), in base64.
        picture = (crop * crop * 3 + crop + PNG_OVERHEAD_BYTES) * 4 // 3 if self.input_image else 0
        return ANSWER_BYTES + len(note.encode()) + top_k * (PREDICTION_BYTES + model.longest_label_bytes) + picture

    def answer(self, result: Result) -> PredictResponse:
        """The model's answer about the one image."""
        model, image = result.model, result.prepared[0]
        predictions = [Prediction(label=model.labels[i], class_id=i, probability=p) for i, p in
                       best_classes(result.outputs[0], model.metadata.output.kind, result.options)]
        return PredictResponse(model=model.name, version=model.version,
                               weights=weights_info(model.metadata), predictions=predictions,
                               image=ImageInfo(width=image.width, height=image.height,
                                               format=image.format),
                               timings_ms=Timings(**result.timings),
                               input_image=_data_url(image.tensor[0], model) if self.input_image else None)

    def encode(self, result: Result) -> Response:
        # Serialised here, once, by pydantic's own encoder; response_model still documents it.
        return Response(self.answer(result).model_dump_json(exclude=None if self.input_image else {"input_image"}),
                        media_type="application/json")


def _uploaded_file(body: bytes, content_type: str) -> bytes:
    """The one file in field `file` of a multipart/form-data body."""
    parts = form_parts(body, content_type)
    uploads = [part for part in parts if part.name == "file" and part.is_file]
    if not uploads:
        names = dict.fromkeys(part.name[:64] for part in parts if part.name is not None)
        raise MissingFileField(list(names)[:20])  # enough to spot a typo, never a huge answer
    if len(uploads) > 1:
        raise TooManyFiles(len(uploads))
    return bytes(uploads[0].content)


def _data_url(tensor, model: ServedModel) -> str:
    buffer = io.BytesIO()
    to_picture(tensor, model.metadata.preprocessing).save(buffer, "PNG", compress_level=1)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
