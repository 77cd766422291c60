"""The load generator's gRPC connection: ModelInfer of the Open Inference Protocol, the photo as a
BYTES input in `raw_input_contents`, as tritonclient.grpc sends it.

The message is serialized once and the answer is not parsed: the channel sends and returns bytes,
so per request the client pays for grpcio's C core and no protobuf, and the server is what is
measured."""
from __future__ import annotations

from grpc import aio

from bench.load import BYTES_LENGTH, TOP_K, Answer
from service.protocols.grpc.proto.grpc_predict_v2_pb2 import DESCRIPTOR, ModelInferRequest

MODEL_INFER = f"/{DESCRIPTOR.services_by_name['GRPCInferenceService'].full_name}/ModelInfer"
# Each channel its own subchannel, so each simulated user has its own HTTP/2 connection, as each
# has its own HTTP/1.1 connection; by default grpcio shares one among channels to the same address.
CHANNEL_OPTIONS = [("grpc.use_local_subchannel_pool", 1)]


def model_infer_message(model: str, image: bytes, output: str | None) -> bytes:
    """The serialized request; with the model's `output` named, only its top classes come back."""
    message = ModelInferRequest(model_name=model)
    message.inputs.add(name="image", datatype="BYTES", shape=[1])
    message.raw_input_contents.append(BYTES_LENGTH.pack(len(image)) + image)
    if output:
        message.outputs.add(name=output).parameters["classification"].int64_param = TOP_K
    return message.SerializeToString()


class GrpcConnection:
    """One simulated user's channel, opened at the first request and again after a close."""

    def __init__(self, address: str, message: bytes) -> None:
        self.address = address
        self.message = message
        self.channel: aio.Channel | None = None
        self.model_infer: aio.UnaryUnaryMultiCallable | None = None

    async def exchange(self) -> Answer:
        if self.channel is None or self.model_infer is None:
            self.channel = aio.insecure_channel(self.address, options=CHANNEL_OPTIONS)
            # No serializers: the prebuilt bytes go out as they are, the answer comes back as bytes.
            self.model_infer = self.channel.unary_unary(MODEL_INFER)
        try:
            await self.model_infer(self.message)
        except aio.AioRpcError as error:
            return Answer(error.code().name, ok=False)
        return Answer("OK", ok=True)

    async def close(self) -> None:
        if self.channel is not None:
            await self.channel.close()
        self.channel = None
        self.model_infer = None
