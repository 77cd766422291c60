"""The Open Inference Protocol over gRPC (`inference.GRPCInferenceService`, as Triton, KServe and
OpenVINO Model Server serve it) and `grpc.health.v1.Health`, on GRPC_PORT: a third adapter on the
one lifecycle. `proto/` holds the definitions and their generated stubs; `codec.py` the messages to
the lifecycle's `Inputs` and back; `status.py` each error's gRPC status; `servicer.py` the RPCs;
`server.py` the grpc.aio server and its bounds."""
