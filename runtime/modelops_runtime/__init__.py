"""modelops inference runtime: an ONNX Runtime server speaking the Open Inference Protocol v2."""

__version__ = "0.1.0"
