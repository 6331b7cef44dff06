"""What both training (choosing a checkpoint and its strength by generation) and evaluation measure
on a steered model's replies: behaviour scorers (scorers.py) and fluency metrics with the one
matched-fluency rule (metrics.py). Below train/ and eval/, so neither imports the other."""
