"""Training flows, one entry (pipeline.train) for two ways of training: through the frozen model
(through/) and on activations captured through llama.cpp (activations/). Shared by both:
contrastive data (data, behaviors/, the model's own replies in rollouts), the strength unit (unit),
the invertible flow in torch (inn), choosing and calibrating by generation (choose, held_out) and
the report. Everything but the linear baselines needs torch (the `[train]` extra)."""
