"""PyTorch definitions of the seven networks and their export to the ONNX model repository."""
