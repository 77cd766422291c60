"""HTTP serving of the ONNX model repository: FastAPI routes over an onnxruntime engine."""
