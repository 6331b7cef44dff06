"""Training on captured activations: capture through llama.cpp (collect), the linear baselines and
probe (linear) and the activation-geometry objective for INN flows (geometry)."""
