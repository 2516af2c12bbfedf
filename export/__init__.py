"""Exporter (ONNX / TensorRT, occupancy cache): lands with the export issue."""
