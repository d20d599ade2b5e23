"""A rank search spread over the machines of a Ray cluster (or this machine's cores).

Without ``--address`` this starts a local Ray cluster on this machine and runs there, so it
works as is::

    python examples/ray_cluster.py

On a cluster:

1. Install the same versions of Python, ranksearch and Ray (``pip install 'ranksearch[ray]'``)
   on every machine. Only code that defines the model or the task outside installed packages
   (a task file, this script) is shipped to the workers; everything else is imported there.
2. Start the head node, then let the others join it::

       head$    ray start --head --port=6379 --num-cpus=8
       worker$  ray start --address=HEAD_IP:6379 --num-cpus=8

   Ray enables token authentication by default: every node and this driver need the
   cluster's token (``ray get-auth-token`` on the head; copy it to ``~/.ray/auth_token`` or set
   ``RAY_AUTH_TOKEN``), and a driver that names an address needs ``RAY_AUTH_MODE=token``.
3. Run the search from the head node (or any machine that reaches it)::

       RAY_AUTH_MODE=token python examples/ray_cluster.py --address HEAD_IP:6379 \\
           --store postgresql://user:password@db-host/ranksearch --max-concurrent 16

   The driver alone writes to the store, as each trial finishes, so the default SQLite file in
   ``--out`` is enough for one search. A database server (``postgresql://...``, with its
   driver installed) lets several searches, from several machines, share results and resume
   each other; an SQLite file on a shared filesystem works for one writer at a time. Run the
   same command again after an interruption: stored configurations are not evaluated again.
4. Stop the cluster with ``ray stop`` on each machine.

What each executor option does (``RayExecutor(...)``, or ``ranksearch search --executor ray``):

- ``address``: "HOST:PORT" of the head node, or "auto" for the cluster started on this
  machine; unset: start a local cluster of ``num_cpus`` CPUs, shut down at the end.
- ``cpus_per_trial`` / ``gpus_per_trial``: what one evaluation reserves (a GPU fraction such
  as 0.5 shares a GPU; run the proxy on it with ``ProxySettings(device="cuda")``).
- ``max_concurrent``: evaluations at once (default: as many as the cluster holds).
- ``early_stop``: "asha" stops candidates whose accuracy falls behind after ``grace_steps``
  fine-tuning steps (stored as pruned, off the front); "none" fine-tunes every candidate fully.
- ``max_failures``: retries of an evaluation that raises or whose worker dies, before it is
  stored as failed with the reason.
"""

from __future__ import annotations

import argparse
from collections import Counter

import ranksearch
from ranksearch.datasets import load_task
from ranksearch.evaluate import ProxySettings
from ranksearch.executors.ray import RayExecutor
from ranksearch.training import pretrained


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", help="the head node's HOST:PORT, or 'auto'")
    parser.add_argument("--store", help="database URL (default: SQLite in --out)")
    parser.add_argument("--out", default="ray-cluster-out")
    parser.add_argument("--evaluations", type=int, default=32)
    parser.add_argument("--steps", type=int, default=200, help="fine-tuning steps per candidate")
    parser.add_argument("--cpus-per-trial", type=float, default=1)
    parser.add_argument("--gpus-per-trial", type=float, default=0)
    parser.add_argument("--max-concurrent", type=int)
    parser.add_argument("--early-stop", choices=["asha", "none"], default="asha")
    args = parser.parse_args()

    # The digits task ships with scikit-learn, so every node has its data; the reference CNN is
    # trained once here (a few seconds) and cached in --out.
    task = load_task("digits")
    model = pretrained("digits-cnn", "digits", cache_dir=args.out, task=task, epochs=8)
    executor = RayExecutor(
        address=args.address,
        cpus_per_trial=args.cpus_per_trial,
        gpus_per_trial=args.gpus_per_trial,
        max_concurrent=args.max_concurrent,
        early_stop=args.early_stop,
        grace_steps=args.steps // 4,  # ASHA's first cut: a quarter of the fine-tuning
    )
    proxy = ProxySettings(steps=args.steps, batch_size=32, report_every=max(args.steps // 8, 1),
                          device="cuda" if args.gpus_per_trial else "cpu")
    result = ranksearch.search(
        model, task, strategy="random", constraints=["flops<=0.5"], evaluations=args.evaluations,
        proxy=proxy, executor=executor, store=args.store, out=args.out, progress=True,
    )

    print(f"{result.stopped}: {result.evaluated} new evaluations, {len(result.results)} stored "
          f"in {result.store_url} (study {result.study})")
    print("statuses:", dict(Counter(r.status for r in result.results)))
    print("evaluations per Ray node:", dict(Counter((t.node or "?")[:8] for t in executor.trials)))
    for r in sorted(result.front(), key=lambda r: r.metrics["flops_ratio"]):
        print(f"  flops {r.metrics['flops_ratio']:.3f}  params {r.metrics['params_ratio']:.3f}  "
              f"accuracy {r.metrics['accuracy']:.4f}")


if __name__ == "__main__":
    main()
