"""Weighted layers that are not ``nn.Linear`` or ``ConvNd``: where their units are.

HAT gates a layer's output units and protects the weight entries that join a used input to a
used unit, so hatconvert must know which axis of the weight holds the units and which the input
features. ``register_layer`` tells it for a class (usable as a class decorator, like timm's
``register_notrace_module``); HuggingFace's GPT-2 ``Conv1D`` (weight stored ``(in, out)``) and
PyTorch Geometric's ``Linear`` are registered here, by name, so neither library is imported.
Register only layers that use their weight as a linear map (each entry joins one input feature
to one output unit) and whose bias, if any, holds one value per unit.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable

from torch import nn

__all__ = ["LayerSpec", "KNOWN_LAYERS", "register_layer", "layer_spec"]


@dataclass(frozen=True)
class LayerSpec:
    """Where a registered layer keeps its units."""

    unit_axis: int = 0    # axis of the weight holding the output units
    input_axis: int = 1   # axis of the weight holding the input features
    feature_dim: int = -1  # dim of the layer's input and output tensors holding the features


# Well-known layers by module and class name, looked up only where the library is imported.
KNOWN_LAYERS: dict[tuple[str, str], LayerSpec] = {
    ("transformers.pytorch_utils", "Conv1D"): LayerSpec(unit_axis=1, input_axis=0),
    ("transformers.modeling_utils", "Conv1D"): LayerSpec(unit_axis=1, input_axis=0),
    ("torch_geometric.nn.dense.linear", "Linear"): LayerSpec(unit_axis=0, input_axis=1),
}
_registered: dict[type, LayerSpec] = {}


def register_layer(cls: type | None = None, *, unit_axis: int = 0, input_axis: int = 1,
                   feature_dim: int = -1) -> type | Callable[[type], type]:
    """Gate every layer of class ``cls`` like a Linear: ``unit_axis`` of its ``weight`` holds
    the output units, ``input_axis`` the input features, and ``feature_dim`` is the dim of its
    input and output tensors that holds the features (-1 like Linear, 1 like a conv).

    ``register_layer(Conv1D, unit_axis=1, input_axis=0)``, or ``@register_layer`` on a class.
    """
    def register(layer_cls: type) -> type:
        if not (isinstance(layer_cls, type) and issubclass(layer_cls, nn.Module)):
            raise TypeError(f"register_layer expects an nn.Module subclass, got {layer_cls!r}")
        for name, axis in (("unit_axis", unit_axis), ("input_axis", input_axis)):
            if isinstance(axis, bool) or not isinstance(axis, int) or axis < 0:
                raise ValueError(f"register_layer({layer_cls.__name__}): {name} must be an "
                                 f"axis of the weight (an int >= 0), got {axis!r}")
        if unit_axis == input_axis:
            raise ValueError(f"register_layer({layer_cls.__name__}): unit_axis and input_axis "
                             f"are both {unit_axis}")
        if feature_dim not in (-1, 1):
            raise ValueError(f"register_layer({layer_cls.__name__}): feature_dim must be -1 "
                             f"(last, like Linear) or 1 (channels, like a conv), got "
                             f"{feature_dim!r}")
        _registered[layer_cls] = LayerSpec(unit_axis, input_axis, feature_dim)
        return layer_cls
    return register if cls is None else register(cls)


def layer_spec(module: nn.Module) -> LayerSpec | None:
    """The registration of ``module``'s class (or a base class), or None."""
    for cls in type(module).__mro__:
        spec = _registered.get(cls)
        if spec is None and cls.__module__ in sys.modules:
            spec = KNOWN_LAYERS.get((cls.__module__, cls.__name__))
        if spec is not None:
            return spec
    return None
