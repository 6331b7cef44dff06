"""Flows to and from other formats: llama.cpp control vectors (cvec) and ONNX graphs (onnx)."""
