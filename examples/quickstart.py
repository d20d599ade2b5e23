"""The Python API in one page: discover, price, compress, search, export.

Run: python examples/quickstart.py  (trains the digits CNN once, ~10 s, then searches)
"""

import torch

import ranksearch
from ranksearch.datasets import load_task
from ranksearch.training import evaluate_accuracy, pretrained

torch.set_num_threads(2)
task = load_task("digits")  # scikit-learn's digits: 1×8×8 images, 10 classes
model = pretrained("digits-cnn", "digits", cache_dir="ranksearch-out/checkpoints")

# 1. The decomposable layers and what each admits.
space = ranksearch.RankSpace.discover(model, task.example_input(), methods=["svd", "tucker2"])
for site in space.decomposable:
    print(site.name, site.weight_shape, site.methods)

# 2. The exact cost of any configuration, without building it.
costs = ranksearch.CostModel(space)
config = space.uniform(0.3, "svd")  # 30% of the parameters in every layer
print({k: round(v, 3) for k, v in costs.metrics(config).items() if k.endswith("ratio")})

# 3. The compressed model: plain torch layers, built from cached factors.
cache = ranksearch.FactorCache(model, space)
small = ranksearch.compress(model, config, cache=cache)
print("accuracy before fine-tuning:", evaluate_accuracy(small, task.val))

# 4. A search for a budget, stored in ranksearch-out/ranksearch.db (re-running resumes).
result = ranksearch.search(
    model, task, strategy="random", constraints=["flops<=0.5"], evaluations=20,
    proxy=ranksearch.ProxySettings(steps=50), space=space, out="ranksearch-out", progress=True,
)
best = result.best("flops<=0.5")
print("best under half the FLOPs:", best.config, round(best.metrics["accuracy"], 4))

# 5. Export exactly the model that was scored (the proxy's fine-tuning included), reload it.
scored = result.model(best)
ranksearch.save("ranksearch-out/quickstart.pt", scored, best.config)
loaded, _ = ranksearch.load("ranksearch-out/quickstart.pt", model)
print("reloaded accuracy:", evaluate_accuracy(loaded, task.val))
