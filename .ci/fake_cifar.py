"""Write a small folder in CIFAR-10's binary format (random images) to the given path."""

import sys
from pathlib import Path

import numpy as np

root = Path(sys.argv[1])
root.mkdir(parents=True, exist_ok=True)
rng = np.random.default_rng(0)
names = [*(f"data_batch_{i}.bin" for i in range(1, 6)), "test_batch.bin"]
for name in names:
    records = rng.integers(0, 256, (100, 1 + 3072), dtype=np.uint8)
    records[:, 0] = rng.integers(0, 10, 100)  # each record: a label byte, then 3072 pixels
    (root / name).write_bytes(records.tobytes())
