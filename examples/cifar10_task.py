"""Searching ranks of ResNet-20 on CIFAR-10 from a folder you bring.

CIFAR-10's "python version" (cifar-10-python.tar.gz, unpacked: data_batch_1..5, test_batch)
is read from the folder given as the first argument; nothing is downloaded.

    python examples/cifar10_task.py /data/cifar-10-batches-py

The CLI does the same:

    ranksearch search --task cifar10 --data /data/cifar-10-batches-py --model resnet20 \\
        --strategy uniform --constraint "flops<=0.5" --steps 200
"""

import sys

import ranksearch
from ranksearch.task import load_task, pretrained

root = sys.argv[1]
task = load_task("cifar10", root=root, train_size=10000, val_size=2000)
# trains once (a GPU helps: ~30 epochs) and caches the checkpoint
model = pretrained("resnet20", "cifar10", cache_dir="ranksearch-out/checkpoints", task=task,
                   progress=True)
result = ranksearch.search(
    model, task, strategy="uniform", constraints=["flops<=0.5"], evaluations=24,
    proxy=ranksearch.ProxySettings(steps=200, batch_size=128), out="ranksearch-out/cifar10",
    progress=True,
)
print(result.best())
