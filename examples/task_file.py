"""A task file for the CLI: any model and data, searched with

    ranksearch search --task examples/task_file.py:factory --constraint "params<=0.5"

The factory returns ``(model, Task)``. The model should be trained already (here it is
trained in a few seconds on scikit-learn's breast-cancer data).
"""

import torch
from sklearn.datasets import load_breast_cancer
from sklearn.preprocessing import StandardScaler
from torch import nn
from torch.utils.data import TensorDataset

from ranksearch.task import Task
from ranksearch.training import train_baseline


def factory() -> tuple[nn.Module, Task]:
    x, y = load_breast_cancer(return_X_y=True)
    x = StandardScaler().fit_transform(x)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x = torch.tensor(x, dtype=torch.float32)[order]
    y = torch.tensor(y)[order]
    cut = int(0.8 * len(x))
    task = Task(
        "breast-cancer",
        train=TensorDataset(x[:cut], y[:cut]),
        val=TensorDataset(x[cut:], y[cut:]),
    )
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(30, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                          nn.Linear(128, 2))
    train_baseline(model, task, epochs=30, lr=1e-3, batch_size=32)
    return model, task
