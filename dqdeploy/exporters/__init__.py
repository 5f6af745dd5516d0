"""Exporters: PyTorch -> ONNX (float graph + Q/DQ surgery) -> TensorRT engines."""
