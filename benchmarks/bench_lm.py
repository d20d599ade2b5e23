"""The language-model task: the best searched ranks against uniform SVD ranks at params <= 0.5.

gpt-tiny, trained once on the built-in ``text`` task (byte-level Python standard-library
sources) and cached like every reference model, is cut to at most half its parameters in two
ways: by a search (``--evaluations`` candidates, each fine-tuned ``--steps`` steps by the proxy
and scored by validation perplexity, objectives perplexity and params), and by uniform SVD
ranks (the same fraction of parameters in every layer, the largest fraction within the
budget), scored by the same proxy. Both are then fine-tuned the same way (``--epochs`` of
`ranksearch.schedules.finetune`, one-shot), and so is the dense model (the fine-tuning is
extra training for it too); the validation and test perplexity of each are printed, with the
wall time of each part. The search's store is in ``--out``, so a re-run resumes it.

Run: ``python benchmarks/bench_lm.py``.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch

import ranksearch
from ranksearch.config import Config
from ranksearch.datasets import load_task
from ranksearch.schedules import finetune
from ranksearch.training import evaluate_metrics, pretrained

BUDGET = "params<=0.5"


def uniform_config(result: ranksearch.SearchResult, limit: float) -> Config:
    """The uniform SVD config with the largest per-layer fraction whose params ratio is at
    most ``limit``."""
    for fraction in np.linspace(1.0, 0.01, 100):
        config = result.space.uniform(float(fraction), "svd")
        if result.costs.metrics(config)["params_ratio"] <= limit:
            return config
    raise SystemExit(f"no uniform SVD config meets {BUDGET}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--evaluations", type=int, default=20)
    parser.add_argument("--steps", type=int, default=60, help="proxy fine-tuning steps")
    parser.add_argument("--strategy", default="nsga2")
    parser.add_argument("--epochs", type=int, default=1, help="final fine-tuning epochs")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/out/lm")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    task = load_task("text")
    model = pretrained("gpt-tiny", "text", task=task, progress=True)
    trained = time.perf_counter()

    def perplexities(module: torch.nn.Module) -> tuple[float, float]:
        return tuple(evaluate_metrics(module, getattr(task, split), ("perplexity",),
                                      loss=task.loss)["perplexity"] for split in ("val", "test"))

    proxy = ranksearch.ProxySettings(steps=args.steps, batch_size=32, lr=1e-3)
    options = {"seed_with": "uniform"} if args.strategy == "nsga2" else None
    result = ranksearch.search(
        model, task, strategy=args.strategy, strategy_options=options,
        objectives=["perplexity", "params"], constraints=[BUDGET],
        evaluations=args.evaluations, proxy=proxy, out=args.out, seed=0, progress=True,
    )
    searched = time.perf_counter()
    best = result.best()
    if best is None:
        raise SystemExit(f"the search found nothing under {BUDGET}: "
                         + "; ".join(str(r.reason) for r in result.results))
    uniform = uniform_config(result, 0.5)
    uniform_proxy = result.evaluator(uniform)
    rows = [("dense", Config(), None, model)]
    for name, config, proxy_ppl in (("dense, tuned", Config(), None),
                                    ("uniform svd", uniform, uniform_proxy.metrics["perplexity"]),
                                    (f"best {args.strategy}", best.config,
                                     best.metrics["perplexity"])):
        tuned = finetune(model, config, task, epochs=args.epochs, lr=1e-3, batch_size=64,
                         cache=result.evaluator.cache, progress=True)
        rows.append((name, config, proxy_ppl, tuned))
    done = time.perf_counter()
    print(f"\ntext: gpt-tiny, {BUDGET}; {result.evaluated} searched candidates "
          f"({proxy.describe()} each), then {args.epochs} epoch(s) of fine-tuning of the "
          "dense, the uniform and the best")
    print(f"{'model':16} {'params':>8} {'ratio':>6} {'proxy ppl':>9} {'val ppl':>8} "
          f"{'test ppl':>8}")
    for name, config, proxy_ppl, module in rows:
        costs = result.costs.metrics(config)
        val, test = perplexities(module)
        shown = f"{proxy_ppl:9.3f}" if proxy_ppl is not None else f"{'-':>9}"
        print(f"{name:16} {int(costs['params']):8,} {costs['params_ratio']:6.3f} {shown} "
              f"{val:8.3f} {test:8.3f}")
    print(f"\nbest config: {best.config}")
    print(f"seconds: reference model {trained - start:.0f} (0 when cached), search "
          f"{searched - trained:.0f}, fine-tuning {done - searched:.0f}, total "
          f"{time.perf_counter() - start:.0f}")


if __name__ == "__main__":
    sys.exit(main())
