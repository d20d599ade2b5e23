"""Model surgery: a compressed copy of a model from a `Config`, and its save/load round trip.

A factorized layer is replaced by the module its factorization builds; a factorized projection
of an `nn.MultiheadAttention` replaces the attention module by a `FactorizedAttention`. Torch's
transformer layers that hold a replaced module are set to take their slow (module-calling)
path, and a Hugging Face model's ``save_pretrained`` refuses, pointing to `save`/`load`.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import factorize
from .cache import FactorCache
from .clone import clone_module
from .config import Config
from .errors import ExportError, ModelFileError, UnknownLayerError
from .factorize.attention import FactorizedAttention
from .site import Layer, find_layers

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
    layers = {layer.name: layer for layer in find_layers(model)}
    built: dict[str, nn.Module] = {}
    for name, choice in config.items():
        layer = _layer(model, layers, name)
        site = cache.space.site(name) if cache is not None else layer.site()
        fac = factorize.get(choice.method)
        rank = fac.normalize_rank(site, choice.rank)
        if cache is not None:
            module = cache.build(name, choice)
        else:
            weight, bias = layer.weight.detach(), layer.bias
            bias = None if bias is None else bias.detach()
            factors = fac.decompose(weight, site, rank) if decompose else None
            module = fac.build(site, rank, factors, bias)
            if not decompose:
                module.to(device=weight.device, dtype=weight.dtype)
        built[name] = module.train(layer.module.training)
    replace: dict[int, nn.Module] = {}
    owners: dict[str, nn.Module] = {}
    for name, module in built.items():
        layer = layers[name]
        owners[layer.owner] = layer.module
        if layer.role is None:
            replace[id(layer.module)] = module
    for owner, mha in owners.items():
        if isinstance(mha, nn.MultiheadAttention):
            projections = {layers[n].role: m for n, m in built.items() if layers[n].owner == owner}
            replace[id(mha)] = FactorizedAttention(mha, projections)  # type: ignore[arg-type]
    # Copy everything but the replaced layers (their weights would be copied for nothing).
    compressed = clone_module(model, replace)
    if built:
        _slow_paths(compressed, owners)
        if callable(getattr(compressed, "save_pretrained", None)):
            compressed.save_pretrained = RefuseSavePretrained()
    return compressed


def _slow_paths(model: nn.Module, replaced: Any) -> None:
    """Make the torch transformer layers of ``model`` that hold a ``replaced`` module (dotted
    names) take the path that calls their submodules: their fast paths read the dense weights
    (``linear1.weight``, ``self_attn.in_proj_weight``, …) that a factorized layer lacks.

    A `nn.TransformerEncoderLayer` then sees a non-ReLU/GELU activation (the flag only picks
    the fused kernel; the activation itself is unchanged), and a `nn.TransformerEncoder` no
    nested-tensor fast path (so padded positions are computed rather than zeroed).
    """
    for name, module in model.named_modules():
        if not any(r.startswith(f"{name}.") or not name for r in replaced):
            continue
        if isinstance(module, nn.TransformerEncoderLayer):
            module.activation_relu_or_gelu = 0
        elif isinstance(module, nn.TransformerEncoder):
            module.use_nested_tensor = False


class RefuseSavePretrained:
    """The ``save_pretrained`` of a compressed Hugging Face model: it raises `ExportError`.

    The model's class and config describe the dense architecture, so what ``save_pretrained``
    wrote would load back as the dense model with its factorized layers re-initialised.
    """

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        raise ExportError(
            "this model was compressed by ranksearch: its Hugging Face class and config "
            "describe the dense architecture, so save_pretrained would write weights that "
            "from_pretrained silently re-initialises. Save it with ranksearch.save(path, model, "
            "config) and load it with ranksearch.load(path, base_model), where base_model is "
            "the dense model (e.g. from from_pretrained or from its config)."
        )


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

    Returns the compressed model, with the saved weights, and its config. The file is read
    as tensors and plain values only (never unpickling objects, which could run code); a
    missing, empty, truncated or foreign file raises `ModelFileError`.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"no compressed model at {path}; write one with ranksearch.save")
    if path.stat().st_size == 0:
        raise ModelFileError(f"{path} is empty, not a ranksearch model file; write it again "
                             "with ranksearch.save")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # objects other than tensors; their code is not run
        raise ModelFileError(f"{path} is not a ranksearch model file: it is corrupt, or holds "
                             "objects other than tensors and plain values (not loaded: they "
                             "could run code)") from None
    except OSError as e:
        raise ModelFileError(f"cannot read {path} ({e.strerror or e})") from None
    except Exception as e:  # torch's reader raises RuntimeError, EOFError, KeyError, ...
        raise ModelFileError(f"{path} is not a ranksearch model file, or it is truncated or "
                             f"corrupt ({type(e).__name__}); write it again with "
                             "ranksearch.save") from None
    if (not isinstance(payload, dict) or payload.get("format") != FORMAT
            or not isinstance(payload.get("config"), str)
            or not isinstance(payload.get("state_dict"), dict)):
        raise ModelFileError(f"{path} is not a ranksearch compressed model (written by "
                             "ranksearch.save)")
    config = Config.from_json(payload["config"])
    model = compress(base_model, config, decompose=False)
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as e:
        why = " ".join(line.strip() for line in str(e).splitlines()[:2])[:300]
        raise ModelFileError(f"the weights in {path} do not fit the base model given ({why}); "
                             "pass the dense model the file was compressed from") from None
    return model, config


def _layer(model: nn.Module, layers: dict[str, Layer], name: str) -> Layer:
    if name in layers:
        return layers[name]
    kinds = ("nn.Conv2d, nn.Linear, Hugging Face Conv1D layers and the projections of "
             "nn.MultiheadAttention (e.g. 'attn.q_proj')")
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise UnknownLayerError(
            f"the model has no layer named {name!r}; use RankSpace.discover to list its layers "
            f"({kinds} can be factorized)"
        ) from None
    raise UnknownLayerError(
        f"layer {name!r} is a {type(module).__name__}; only {kinds} can be factorized"
    )
