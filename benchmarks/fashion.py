"""Fashion-MNIST for the benchmarks: the Debian package's files, installed on demand."""

from __future__ import annotations

import subprocess

from ranksearch.datasets import load_task
from ranksearch.errors import DatasetNotFoundError


def ensure_fashion_mnist() -> bool:
    """Install the Debian package if the data is missing; False when it cannot be had."""
    try:
        load_task("fashion-mnist", train_size=10, val_size=10)
        return True
    except DatasetNotFoundError:
        pass
    print("installing dataset-fashion-mnist with apt-get ...", flush=True)
    try:
        ok = subprocess.run(["apt-get", "install", "-y", "-q", "dataset-fashion-mnist"],
                            capture_output=True).returncode == 0
    except FileNotFoundError:  # no apt-get on this system
        ok = False
    if not ok:
        print("skipping fashion-mnist: `apt-get install dataset-fashion-mnist` failed "
              "(run it as root on Debian/Ubuntu, or pass the digits task)")
    return ok
