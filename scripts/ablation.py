"""Ablation of the activation-geometry INN objective (`train --objective geometry`) on a built-in
behaviour (docs/training.md):

    python scripts/ablation.py [behavior] [layer]

Trains phi with each loss term switched off in turn on the same cached activations and prints the
held-out proxies at the calibrated strength (negatives move |v| on average, as mean-diff does).
"""

import sys

from innsteer_local import SteeredLlama
from innsteer_local.runtime import registry as models
from innsteer_local.train import behaviors
from innsteer_local.train.activations.collect import collect_dataset
from innsteer_local.train.activations.geometry import GeometryConfig, train_geometry

behavior = sys.argv[1] if len(sys.argv) > 1 else "honesty"
layer = int(sys.argv[2]) if len(sys.argv) > 2 else 15
path, _ = models.resolve_model("smollm2-135m")
llm = SteeredLlama(str(path), n_ctx=1024, verbose=False)
data = behaviors.build(llm, behaviors.recipe(behavior), models.cache_dir() / "training")
a = collect_dataset(llm, data, [layer], cache_dir=models.cache_dir() / "training" / "activations")
variants = {
    "full objective": {},
    "no transport term": {"transport_weight": 0.0},
    "no background term": {"background_weight": 0.0, "neutral_weight": 0.0},
    "no density term": {"nll_weight": 0.0},
    "density only": {"transport_weight": 0.0, "background_weight": 0.0, "neutral_weight": 0.0, "nll_weight": 1.0},
}
print(f"{behavior}, layer {layer}: held-out proxies at the calibrated strength")
print(f"{'variant':<22} {'flip rate':>9} {'bg move':>8} {'neutral':>8} {'score':>7} {'epoch':>5}")
first = True
for name, kw in variants.items():
    r = train_geometry(layer, a.pos[layer], a.neg[layer], a.background[layer], a.neutral[layer], a.pos_pair,
                       a.neg_pair, a.neg_target, llm.model_info, GeometryConfig(**kw))
    if first:
        i = r.metrics["identity_start"]
        print(f"{'identity (= mean-diff)':<22} {i['flip_rate']:>9.3f} {i['background_move']:>8.3f} "
              f"{i['neutral_move']:>8.3f} {i['score']:>7.3f} {0:>5}")
        first = False
    s = r.metrics["selected"]
    best = max(r.history, key=lambda h: h["val_score"])
    print(f"{name:<22} {best['val_flip_rate']:>9.3f} {best['val_background_move']:>8.3f} "
          f"{best['val_neutral_move']:>8.3f} {best['val_score']:>7.3f} {best['epoch']:>5}")
