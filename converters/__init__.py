"""Converters between flow files and other formats (installed as innsteer_local.converters).

- flow_gguf: Flow -> GGUF flow file (the writer; readers live in innsteer_local.flow and native/).
"""
