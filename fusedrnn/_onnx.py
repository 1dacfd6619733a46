"""ONNX export of the fused layers (placeholder, filled below)."""
