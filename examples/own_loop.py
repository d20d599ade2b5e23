"""Your own metric and training loop: a regression model scored by MSE, fine-tuned by your own
training step (gradient clipping, a scheduler), with the fine-tuned weights kept and exported.

Run: python examples/own_loop.py  (about 15 s on 2 cores)
"""

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import ranksearch

torch.set_num_threads(1)  # small models run fastest on one thread
torch.manual_seed(0)

# Data: y = a smooth function of 32 features, as DataLoaders (any iterable of batches works).
x = torch.randn(2048, 32)
y = torch.sin(x @ torch.randn(32, 8) / 4).sum(1, keepdim=True)
train = DataLoader(TensorDataset(x[:1536], y[:1536]), batch_size=64, shuffle=True,
                   generator=torch.Generator().manual_seed(0))
val = DataLoader(TensorDataset(x[1536:], y[1536:]), batch_size=256)

model = nn.Sequential(nn.Linear(32, 128), nn.GELU(), nn.Linear(128, 128), nn.GELU(),
                      nn.Linear(128, 1))
opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
for _ in range(10):  # the dense model, trained by a plain loop
    for xb, yb in train:
        opt.zero_grad()
        F.mse_loss(model(xb), yb).backward()
        opt.step()
model.eval()

schedules: dict[int, torch.optim.lr_scheduler.LRScheduler] = {}


def train_step(model: nn.Module, batch, optimizer: torch.optim.Optimizer) -> torch.Tensor:
    """One whole step, as you like it: here clipping and a cosine schedule per candidate
    (AMP would go here too: torch.autocast and a GradScaler)."""
    if id(optimizer) not in schedules:
        schedules.clear()  # one optimizer per candidate
        schedules[id(optimizer)] = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, 30)
    inputs, targets = batch
    optimizer.zero_grad()
    loss = F.mse_loss(model(inputs), targets)
    loss.backward()
    nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    schedules[id(optimizer)].step()
    return loss


task = ranksearch.Task("regression", train, val, loss=F.mse_loss, metric="mse",
                       train_step=train_step)
result = ranksearch.search(
    model, task, strategy="random", constraints=["params<=0.5"], evaluations=6,
    proxy=ranksearch.ProxySettings(steps=30, lr=2e-3), out="ranksearch-out",
    keep_weights=True,
)
print("objectives:", ", ".join(map(str, result.objectives)))  # mse (min), flops
print("dense model mse:", round(result.meta["dense"]["mse"], 4))
best = result.best()  # the lowest MSE under half the parameters
print("best:", best.config, "mse", round(best.metrics["mse"], 4),
      "params", round(best.metrics["params_ratio"], 3))
print("kept weights:", best.weights)

# The kept weights: no second fine-tuning; the exported model scores what the search stored.
exported = ranksearch.export.scored_model(model, task, out="ranksearch-out")
print("exported mse:", round(exported.metrics["mse"], 4))
assert abs(exported.metrics["mse"] - best.metrics["mse"]) < 1e-5
print("wrote", exported.write("ranksearch-out/regression-best.pt"))
