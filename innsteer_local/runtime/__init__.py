"""Running steering: llama.cpp (its build), the native library, SteeredLlama."""
