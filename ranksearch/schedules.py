"""Fine-tuning schedules for the final compressed model: one-shot, iterative and hybrid.

- ``one-shot``: decompose every chosen layer at once, then fine-tune once (Kim et al., ICLR
  2016, for Tucker-2).
- ``iterative``: in model order, decompose one layer from its current (already fine-tuned)
  weights, then fine-tune the whole network with nothing frozen, and go on to the next layer
  (Astrid & Lee, "Deep compression of convolutional neural networks with low-rank
  approximation", ETRI Journal 2018, §3.4–3.5: needed for CP on deep networks; non-freezing
  worked best).
- ``hybrid``: Astrid & Lee's Algorithm 2: the convolutions iteratively, then all linear layers
  at once and one last fine-tune (one-shot is better than iterative for FC layers, §3.3).

Each fine-tune is `ranksearch.training.train_baseline` (AdamW, cosine schedule) for ``epochs``.
"""

from __future__ import annotations

import logging

from torch import nn

from .cache import FactorCache
from .config import Config
from .errors import RankSearchError
from .site import find_layers
from .surgery import compress
from .task import Task
from .training import train_baseline

log = logging.getLogger(__name__)

SCHEDULES = ("one-shot", "iterative", "hybrid")

#: One step of a schedule: ("decompose", site names) or ("finetune", epochs).
Event = tuple[str, tuple[str, ...] | int]


def finetune(
    model: nn.Module,
    config: Config,
    task: Task,
    schedule: str = "one-shot",
    epochs: int = 1,
    lr: float = 1e-3,
    batch_size: int = 64,
    cache: FactorCache | None = None,
    events: list[Event] | None = None,
    progress: bool = False,
) -> nn.Module:
    """A compressed copy of ``model`` with the layers of ``config``, fine-tuned on ``task``
    by ``schedule`` ("one-shot", "iterative" or "hybrid"); ``model`` is left untouched.

    Every fine-tune runs ``epochs`` epochs of `train_baseline` at ``lr`` and ``batch_size``.
    ``cache`` (a `FactorCache` of ``model``) supplies the first decomposition, which starts
    from ``model``'s own weights; later ones decompose the current, fine-tuned weights.
    ``events``, when given, receives each step in order: ``("decompose", names)`` and
    ``("finetune", epochs)``; the steps are also logged at INFO level. ``progress`` shows a
    bar on stderr for each fine-tune ("fine-tune 2/5" in a multi-step schedule). Returns the
    fine-tuned model, in eval mode, with the architecture ``compress(model, config)`` has.
    """
    if schedule not in SCHEDULES:
        raise RankSearchError(
            f"unknown fine-tuning schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}"
        )
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise RankSearchError(f"epochs must be an integer ≥ 1, got {epochs!r}")
    compress(model, config, decompose=False)  # every name and rank is checked before training
    layers = [layer for layer in find_layers(model) if layer.name in config]  # model order
    names = [layer.name for layer in layers]
    convs = [layer.name for layer in layers if isinstance(layer.module, nn.Conv2d)]
    rest = [n for n in names if n not in convs]
    if schedule == "one-shot":
        groups = [names]
    elif schedule == "iterative":
        groups = [[n] for n in names]
    else:
        groups = [[n] for n in convs] + ([rest] if rest else [])
    groups = groups or [[]]  # an empty config still gives a fine-tuned copy
    device = next(model.parameters()).device
    current = model
    for i, group in enumerate(groups):
        step = Config({n: config[n] for n in group})
        current = compress(current, step, cache=cache if i == 0 else None).to(device)
        _record(events, ("decompose", tuple(group)), schedule)
        desc = "fine-tune" if len(groups) == 1 else f"fine-tune {i + 1}/{len(groups)}"
        train_baseline(current, task, epochs=epochs, lr=lr, batch_size=batch_size,
                       progress=progress, desc=desc)
        _record(events, ("finetune", epochs), schedule)
    return current.eval()


def _record(events: list[Event] | None, event: Event, schedule: str) -> None:
    log.info("%s fine-tuning: %s %s", schedule, *event)
    if events is not None:
        events.append(event)


__all__ = ["SCHEDULES", "Event", "finetune"]
