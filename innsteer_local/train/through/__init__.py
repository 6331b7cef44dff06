"""Training through the model: a differentiable copy of the GGUF in torch (hf_model), the
objective on what the steered model says (objective) and the trainer (trainer)."""
