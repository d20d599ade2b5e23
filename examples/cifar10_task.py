"""Searching ranks of ResNet-20 on CIFAR-10 from a folder you bring.

CIFAR-10's "binary version" (cifar-10-binary.tar.gz, unpacked: data_batch_1.bin..5.bin,
test_batch.bin) is read from the folder given as the first argument; nothing is downloaded.
(The "python version" is refused: its batches are pickles, which can run code when read.)

    python examples/cifar10_task.py /data/cifar-10-batches-bin

(``--train-size``, ``--val-size``, ``--epochs``, ``--evaluations`` and ``--steps`` scale it
down, e.g. for a first try.)

The CLI does the same:

    ranksearch search --task cifar10 --data /data/cifar-10-batches-bin --model resnet20 \\
        --strategy uniform --constraint "flops<=0.5" --steps 200
"""

import argparse

import ranksearch
from ranksearch.datasets import load_task
from ranksearch.training import pretrained

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("root", help="the folder of the CIFAR-10 binary batches")
parser.add_argument("--train-size", type=int, default=10000)
parser.add_argument("--val-size", type=int, default=2000)
parser.add_argument("--epochs", type=int, default=None, help="baseline epochs (task default)")
parser.add_argument("--evaluations", type=int, default=24)
parser.add_argument("--steps", type=int, default=200)
parser.add_argument("--out", default="ranksearch-out/cifar10")
args = parser.parse_args()

task = load_task("cifar10", root=args.root, train_size=args.train_size, val_size=args.val_size)
# trains once (a GPU helps: ~30 epochs) and caches the checkpoint
options = {} if args.epochs is None else {"epochs": args.epochs}
model = pretrained("resnet20", "cifar10", cache_dir=f"{args.out}/checkpoints", task=task,
                   progress=True, **options)
result = ranksearch.search(
    model, task, strategy="uniform", constraints=["flops<=0.5"], evaluations=args.evaluations,
    proxy=ranksearch.ProxySettings(steps=args.steps, batch_size=128), out=args.out,
    progress=True,
)
print(result.best())
