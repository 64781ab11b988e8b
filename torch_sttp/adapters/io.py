"""Adapter tensors and files: :func:`adapter_state_dict` (one adapter's tensors only), :func:`save_adapters`
(``adapter_config.json`` + ``adapter_model.safetensors``, PEFT's file names) and :func:`load_adapters`, which checks
the saved configuration against the model before anything changes.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from torch import nn

from ..checkpoint import unshared_tensors
from .model import (
    active_adapter,
    add_adapters_to_layers,
    adapter_info,
    adapter_layers,
    delete_adapter,
    targetable_modules,
    trainable_copies,
)
from .ops import layer_ops

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "FORMAT_VERSION", "adapter_state_dict", "save_adapters", "load_adapters"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT = "torch-sttp-adapter"
FORMAT_VERSION = 1


def adapter_state_dict(model: nn.Module, name: str | None = None) -> dict[str, torch.Tensor]:
    """The tensors of adapter ``name`` (default: the active one) and of its trainable copies, keyed
    ``"<module>.<tensor>"`` by the qualified name of the layer (or module) they belong to; nothing of the base
    model. The tensors are the live ones (detach or clone to keep a snapshot)."""
    name = adapter_info(model, name).name
    out = {}
    for n, layer in adapter_layers(model):
        if name in layer.adapters:
            out.update({f"{n}.{k}": t for k, t in layer.adapters[name].state_dict().items()})
    for n, holder in trainable_copies(model):
        if name in holder.copies:
            out.update({f"{n}.{k}": t for k, t in holder.copies[name].state_dict().items()})
    return out


def _safetensors():
    try:
        import safetensors.torch
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("saving and loading adapters needs safetensors: pip install -c constraints.txt "
                          "safetensors") from e
    return safetensors.torch


def _config(model: nn.Module, name: str) -> dict:
    info = adapter_info(model, name)
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "name": info.name, "kind": info.kind,
        "method": info.method, "rank": info.rank, "two_sided": info.two_sided, "seed": info.seed,
        "target": info.target, "exclude": info.exclude, "trainable": info.trainable,
        "layers": {n: {"type": li.type, "weight_shape": list(li.weight_shape), "rank": li.rank,
                       "rank_out": li.rank_out} for n, li in info.layers.items()},
        "clamped": [list(c) for c in info.clamped], "skipped": [list(s) for s in info.skipped],
    }


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_adapters(model: nn.Module, directory, name: str | None = None) -> Path:
    """Write adapter ``name`` (default: the active one) to ``directory``: ``adapter_config.json`` (kind, method,
    rank, the adapted layers with their weight shapes and ranks, trainable modules) and
    ``adapter_model.safetensors`` (:func:`adapter_state_dict`); each file written atomically. Returns the folder."""
    name = _require_adapter(model, name, "save_adapters")
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = unshared_tensors(adapter_state_dict(model, name))
    text = json.dumps(_config(model, name), indent=2)
    # the weights first: a failed save never leaves a new configuration beside old (or no) weights
    _atomic_write(folder / WEIGHTS_NAME, lambda p: _safetensors().save_file(tensors, p, metadata={"format": "pt"}))
    _atomic_write(folder / CONFIG_NAME, lambda p: Path(p).write_text(text))
    return folder


def _require_adapter(model: nn.Module, name: str | None, what: str) -> str:
    """The adapter's name (default: the active one), or ValueError under ``what``'s name."""
    try:
        return adapter_info(model, name).name
    except ValueError as e:
        raise ValueError(str(e).replace("adapter_info:", f"{what}:", 1)) from None


def read_adapter_config(directory) -> dict:
    """The configuration saved by :func:`save_adapters` in ``directory``, checked for its format."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {str(directory)!r}; pass the folder save_adapters wrote")
    config = json.loads(path.read_text())
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ValueError(f"{path} is not a torch-sttp adapter configuration (format {config.get('format')!r})")
    if config.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{path} was written by a newer torch-sttp (format {config['format_version']}); upgrade "
                         "torch-sttp to load it")
    return config


def _check_layers(model: nn.Module, config: dict) -> None:
    """Every saved layer exists in the model with its type and weight shape; the first mismatch is named."""
    modules = {n: seen for n, _, seen in targetable_modules(model)}
    for n, saved in config["layers"].items():
        if n not in modules:
            raise ValueError(f"layer {n!r} of the saved adapter is not in the model; load it into the model it was "
                             "made for")
        ops, reason = layer_ops(modules[n])
        shape = tuple(modules[n].weight.shape) if ops is not None else None
        if ops is None or ops.name != saved["type"] or shape != tuple(saved["weight_shape"]):
            what = f"{ops.name} with weight shape {shape}" if ops is not None else f"{type(modules[n]).__name__}"
            raise ValueError(f"layer {n!r}: the saved adapter was made for a {saved['type']} with weight shape "
                             f"{tuple(saved['weight_shape'])}, but the model has a {what}")


def load_adapters(model: nn.Module, directory, name: str | None = None) -> nn.Module:
    """Add the adapter saved in ``directory`` under ``name`` (default: its saved name) and make it active; returns
    ``model``. The configuration is checked first (every layer present with its saved type and weight shape; the
    first mismatch is named with both shapes), then every tensor's shape; on any error the model is unchanged."""
    config = read_adapter_config(directory)
    _check_layers(model, config)
    tensors = _safetensors().load_file(str(Path(directory) / WEIGHTS_NAME))
    name = config["name"] if name is None else name
    previous, flags = active_adapter(model), [(p, p.requires_grad) for p in model.parameters()]
    add_adapters_to_layers(model, list(config["layers"]), config["kind"], config["method"], config["rank"], name,
                           config["trainable"], config["two_sided"], config["seed"], initialize=False)
    try:
        _copy_tensors(adapter_state_dict(model, name), tensors)
    except BaseException:
        delete_adapter(model, name, activate=previous)
        for p, flag in flags:  # tensors frozen by hand stay frozen
            p.requires_grad_(flag)
        raise
    return model


def _copy_tensors(ours: dict[str, torch.Tensor], saved: dict[str, torch.Tensor]) -> None:
    missing = [k for k in ours if k not in saved]
    unexpected = [k for k in saved if k not in ours]
    if missing or unexpected:
        raise ValueError(f"the adapter file does not fit the adapter: missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}")
    for k, t in ours.items():
        if tuple(saved[k].shape) != tuple(t.shape):
            layer, _, tensor = k.rpartition(".")
            raise ValueError(f"layer {layer!r}: tensor {tensor!r} has shape {tuple(saved[k].shape)} in the file but "
                             f"{tuple(t.shape)} in the model")
    with torch.no_grad():
        for k, t in ours.items():
            t.copy_(saved[k])
