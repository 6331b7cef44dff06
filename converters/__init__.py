"""Converters between flow files and other formats (installed as innsteer_local.converters).

- flow_gguf: Flow -> GGUF flow file (the writer; readers live in innsteer_local.flow and native/).
- cvec: llama.cpp control vectors <-> linear flows.
- onnx_export: Flow -> ONNX graphs of phi, phi^-1 and the steering map (needs the [onnx] extra).
"""
