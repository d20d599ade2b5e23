"""Model surgery: a compressed copy of a model from a `Config`, and its save/load round trip."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from . import factorize
from .cache import FactorCache
from .clone import clone_module
from .config import Config
from .errors import ConfigError, RankSearchError, UnknownLayerError
from .site import Site

FORMAT = "ranksearch.compressed"
VERSION = 1


def compress(
    model: nn.Module,
    config: Config,
    cache: FactorCache | None = None,
    decompose: bool = True,
) -> nn.Module:
    """A copy of ``model`` with the layers named in ``config`` replaced; ``model`` is untouched.

    With ``cache`` the factors come from it (and its space validates the config); without, each
    layer is decomposed here. ``decompose=False`` builds the architecture only, with default
    weights, ready for ``load_state_dict``. Layers left out of ``config`` are copied as they are.
    """
    if cache is not None:
        config = cache.space.validate(config)
    targets = {}
    for name, choice in config.items():
        module = _layer(model, name)
        site = cache.space.site(name) if cache is not None else Site.from_module(name, module)
        fac = factorize.get(choice.method)
        rank = fac.normalize_rank(site, choice.rank)
        if cache is not None:
            built = cache.build(name, choice)
        else:
            bias = None if module.bias is None else module.bias.detach()
            factors = fac.decompose(module.weight.detach(), site, rank) if decompose else None
            built = fac.build(site, rank, factors, bias)
            if not decompose:
                built.to(device=module.weight.device, dtype=module.weight.dtype)
        built.train(module.training)
        targets[name] = (module, built)
    # Copy everything but the replaced layers (their weights would be copied for nothing).
    return clone_module(model, {id(module): built for module, built in targets.values()})


def save(path: str | os.PathLike, model: nn.Module, config: Config) -> Path:
    """Write a compressed model and the config that built it to ``path`` (a torch file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "config": json.dumps(config.to_json()),
        "state_dict": model.state_dict(),
    }
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def load(path: str | os.PathLike, base_model: nn.Module) -> tuple[nn.Module, Config]:
    """Rebuild a model written by `save` on ``base_model`` (the dense architecture).

    Returns the compressed model, with the saved weights, and its config.
    """
    path = Path(path)
    if not path.is_file():
        raise RankSearchError(f"no compressed model at {path}; write one with ranksearch.save")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ConfigError(f"{path} is not a ranksearch compressed model (written by save)")
    config = Config.from_json(payload["config"])
    model = compress(base_model, config, decompose=False)
    model.load_state_dict(payload["state_dict"])
    return model, config


def _layer(model: nn.Module, name: str) -> nn.Module:
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise UnknownLayerError(
            f"the model has no layer named {name!r}; use RankSpace.discover to list its layers"
        ) from None
    if not isinstance(module, nn.Conv2d | nn.Linear):
        raise UnknownLayerError(
            f"layer {name!r} is a {type(module).__name__}; only nn.Conv2d and nn.Linear layers "
            "can be factorized"
        )
    return module
