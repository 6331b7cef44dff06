"""Training flows: contrastive data (data, behaviors/) -> activations through llama.cpp
(collect) -> a flow (linear baselines in linear, the invertible flow in inn) -> a report.
Everything but the linear baselines needs torch (the `[train]` extra)."""
