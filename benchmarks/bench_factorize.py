"""Building compressed ResNet-20 candidates: from the factor cache vs decomposing from scratch.

Every conv layer of ResNet-20 (3×32×32 input) is factorized with tucker2 and with svd at
several uniform parameter fractions. Three ways to build each candidate:

- cached: `ranksearch.compress` with a warm `FactorCache` (slices of one decomposition);
- scratch: `ranksearch.compress` without a cache (every layer decomposed again);
- tensorly-torch: `tltorch.FactorizedConv.from_conv(factorization="tucker")` on every conv
  layer, where it installs (for the tucker2 rows; it has no channel-SVD convolution).

Target: a cached build at least 20× faster than from scratch. Run: ``make bench`` or
``python benchmarks/bench_factorize.py``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings

import torch

import ranksearch
from ranksearch.models import resnet20

FRACTIONS = (0.2, 0.35, 0.5, 0.75)


def timed(fn, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def tltorch_build(model: torch.nn.Module, names: list[str], fraction: float):
    import tltorch

    new = copy.deepcopy(model)
    for name in names:
        conv = new.get_submodule(name)
        parent, _, attr = name.rpartition(".")
        fact = tltorch.FactorizedConv.from_conv(conv, rank=fraction, factorization="tucker")
        setattr(new.get_submodule(parent) if parent else new, attr, fact)
    return new


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", module="tensorly")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = resnet20(3, 10).eval()
    x = torch.zeros(1, 3, 32, 32)
    space = ranksearch.RankSpace.discover(model, x, methods=["tucker2", "svd"])
    convs = [s.name for s in space.decomposable if s.kind == "conv2d"]
    try:
        import tltorch  # noqa: F401

        have_tltorch = True
    except ImportError:
        have_tltorch = False

    print(f"ResNet-20, {len(convs)} conv layers factorized; median of {args.repeats} builds, "
          f"{args.threads} threads")
    print(f"{'method':8} {'fraction':>8} {'cached ms':>10} {'scratch ms':>11} {'speed-up':>9}"
          + (f" {'tltorch ms':>11}" if have_tltorch else ""))
    ratios = []
    for method in ("tucker2", "svd"):
        cache = ranksearch.FactorCache(model, space)
        start = time.perf_counter()
        for name in convs:  # warm: one decomposition per layer
            cache.factors(name, method, space.ranks(name, method)[-1])
        warm = time.perf_counter() - start
        for fraction in FRACTIONS:
            config = ranksearch.Config(
                {k: v for k, v in space.uniform(fraction, method).items() if k in convs}
            )
            cached = timed(lambda c=config, k=cache: ranksearch.compress(model, c, cache=k),
                           args.repeats)
            scratch = timed(lambda c=config: ranksearch.compress(model, c), args.repeats)
            ratios.append(scratch / cached)
            line = (f"{method:8} {fraction:8.2f} {cached * 1e3:10.1f} {scratch * 1e3:11.1f} "
                    f"{scratch / cached:8.1f}×")
            if have_tltorch and method == "tucker2":
                tl = timed(lambda f=fraction: tltorch_build(model, convs, f), args.repeats)
                line += f" {tl * 1e3:11.1f}"
            print(line)
        assert set(cache.decompositions.values()) == {1}
        print(f"{method}: warming the cache (one decomposition per layer) took {warm * 1e3:.1f} ms")
    print(f"\ncached vs scratch: median speed-up {statistics.median(ratios):.1f}×, "
          f"minimum {min(ratios):.1f}× (target ≥ 20×)")
    if not have_tltorch:
        print("tensorly-torch not installed: `pip install tensorly-torch` to compare with it")


if __name__ == "__main__":
    main()
