"""Write a small folder in CIFAR-10's python-batch format (random images) to the given path."""

import pickle
import sys
from pathlib import Path

import numpy as np

root = Path(sys.argv[1])
root.mkdir(parents=True, exist_ok=True)
rng = np.random.default_rng(0)
for name, count in [*((f"data_batch_{i}", 100) for i in range(1, 6)), ("test_batch", 100)]:
    batch = {b"data": rng.integers(0, 256, (count, 3072), dtype=np.uint8),
             b"labels": [int(v) for v in rng.integers(0, 10, count)]}
    (root / name).write_bytes(pickle.dumps(batch))
