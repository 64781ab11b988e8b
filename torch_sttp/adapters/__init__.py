"""Adapters: fine-tune a frozen pretrained model with exactly orthogonal / spectral SVDP and STTP updates, then merge,
unload or save them (PEFT's lifecycle and file names).

    >>> model = torch_sttp.add_adapters(model, "rotation", rank=8, target=nn.Linear, trainable=["classifier"])
    >>> ...train...                                   # only the adapters and the classifier train
    >>> with torch_sttp.adapters_disabled(model): ref = model(x)     # the base model's outputs
    >>> torch_sttp.save_adapters(model, "run/adapter")              # adapter_config.json + adapter_model.safetensors
    >>> torch_sttp.merge_adapters(model)                            # plain layers with W'

Kinds: ``"principal"`` (W_res + U(θ)ΣV(θ)ᵀ, projected from W), ``"delta"`` (W + U·diag(s)·Vᵀ, s = 0 at init) and
``"rotation"`` (W·H or H_out·W·H, H a product of Householder reflectors, never formed). Each adapted layer is
replaced by an :class:`~torch_sttp.adapters.layer.AdapterLayer` holding the untouched base layer. The package:
:mod:`.ops` (per layer type), :mod:`.updates` (the adapters' tensors and math, the reflector planner), :mod:`.layer`
(the wrapper modules), :mod:`.model` (add, lifecycle, the model's :class:`AdapterRecord`) and :mod:`.io` (files).
"""
from .io import CONFIG_NAME, WEIGHTS_NAME, adapter_state_dict, load_adapters, read_adapter_config, save_adapters
from .layer import AdapterLayer, TrainableCopies
from .model import (
    AdapterInfo,
    AdapterRecord,
    LayerInfo,
    ParameterCounts,
    active_adapter,
    adapter_info,
    adapter_layers,
    adapter_names,
    adapter_record,
    adapters_disabled,
    add_adapters,
    add_adapters_to_layers,
    delete_adapter,
    merge_adapters,
    parameter_counts,
    set_active_adapter,
    targetable_modules,
    trainable_copies,
    unload_adapters,
)
from .updates import ReflectorPlanner, RotationUpdate, SpectralUpdate

__all__ = [
    "CONFIG_NAME", "WEIGHTS_NAME", "AdapterInfo", "AdapterRecord", "LayerInfo", "ParameterCounts",
    "AdapterLayer", "TrainableCopies", "SpectralUpdate", "RotationUpdate", "ReflectorPlanner",
    "add_adapters", "add_adapters_to_layers", "set_active_adapter", "active_adapter", "adapter_names",
    "adapter_info", "adapter_record", "adapter_layers", "trainable_copies", "targetable_modules",
    "adapters_disabled", "merge_adapters", "unload_adapters", "delete_adapter", "parameter_counts",
    "adapter_state_dict", "save_adapters", "load_adapters", "read_adapter_config",
]
