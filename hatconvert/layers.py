"""Which torch layers hatconvert rewrites, and the task-indexed containers it rewrites them into.

Matching is by ``isinstance`` so that subclasses (timm's ``Conv2dSame``, ``StdConv2d``,
``BatchNormAct2d``, ``LayerNorm2d``) are rewritten with their own behaviour kept.
"""

from __future__ import annotations

import copy
import functools
import importlib
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd
from torch.nn.modules.instancenorm import _InstanceNorm

from .gates import apply_gate, can_fold_into_norm, gated_batch_norm
from .registry import layer_spec

__all__ = ['input_features', 'updates_statistics', 'GATABLE_TYPES', 'NORM_TYPES', 'EXTRA_NORM_CLASSES', 'ZERO_PRESERVING_NORM_NAMES',
           'rows_are_units', 'gate_node', 'extra_norm_types', 'TRAIN_ONLY_CLASSES',
           'train_only_types', 'cond_conv_types', 'is_cond_conv', 'is_gatable', 'is_norm',
           'maps_zero_to_zero', 'uses_weight_as_is', 'normalizes_each_unit', 'norm_channel_dim',
           'gate_behind_norm', 'has_hooks', 'output_units', 'unit_dim', 'own_tensors',
           'TaskIndexed', 'TaskParameter']

GATABLE_TYPES: tuple[type, ...] = (nn.Linear, _ConvNd)
NORM_TYPES: tuple[type, ...] = (_BatchNorm, _InstanceNorm, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)

# Norms and per-channel scales that are not torch norms, by module and class name; each is
# task-indexed like a torch norm (one copy per task, whatever the loose policy). Classes that a
# library version lacks are skipped. Those that map a zero entry to zero (RMS norms without
# bias, ``x * gamma`` scales) are listed again in ZERO_PRESERVING_NORM_NAMES for propagation.
EXTRA_NORM_CLASSES: dict[str, tuple[str, ...]] = {
    "timm.layers.norm": ("RmsNorm", "RmsNorm2d", "RmsNormFp32", "RmsNorm2dFp32", "SimpleNorm",
                         "SimpleNorm2d", "SimpleNormFp32", "SimpleNorm2dFp32"),
    "timm.layers.norm_act": ("RmsNormAct", "RmsNormAct2d", "RmsNormActFp32", "RmsNormAct2dFp32",
                             "FrozenBatchNormAct2d"),
    "timm.layers.evo_norm": ("EvoNorm2dB0", "EvoNorm2dB1", "EvoNorm2dB2", "EvoNorm2dS0",
                             "EvoNorm2dS1", "EvoNorm2dS2"),
    "timm.layers.filter_response_norm": ("FilterResponseNormAct2d", "FilterResponseNormTlu2d"),
    "timm.layers.grn": ("GlobalResponseNorm",),
    "timm.layers.inplace_abn": ("InplaceAbn",),
    "timm.layers.layer_scale": ("LayerScale", "LayerScale2d"),
    "timm.models.fastvit": ("LayerScale2d",),
    "timm.models.swiftformer": ("LayerScale2d",),
    "timm.models.metaformer": ("Scale",),
    "timm.models.mlp_mixer": ("Affine",),
    "timm.models.hgnet": ("LearnableAffineBlock",),
}
ZERO_PRESERVING_NORM_NAMES = {"RmsNorm", "RmsNorm2d", "RmsNormFp32", "RmsNorm2dFp32", "SimpleNorm",
                              "SimpleNorm2d", "SimpleNormFp32", "SimpleNorm2dFp32", "LayerScale",
                              "LayerScale2d", "Scale"}


@functools.lru_cache(maxsize=None)
def extra_norm_types() -> tuple[type, ...]:
    """The classes of ``EXTRA_NORM_CLASSES`` that can be imported here."""
    return _importable(EXTRA_NORM_CLASSES)


# Stateless modules whose forward branches on ``self.training`` (stochastic depth, drop block,
# patch dropout): kept whole by the tracer, so that they still act in training after the model
# is traced in eval mode. Each maps a zero entry to zero.
TRAIN_ONLY_CLASSES: dict[str, tuple[str, ...]] = {
    "timm.layers.drop": ("DropPath", "DropBlock2d"),
    "timm.layers.patch_dropout": ("PatchDropout",),
    "torchvision.ops.stochastic_depth": ("StochasticDepth",),
}


def _importable(classes: dict[str, tuple[str, ...]]) -> tuple[type, ...]:
    found = []
    for module_name, names in classes.items():
        try:
            module = importlib.import_module(module_name)
        except Exception:  # the library (or that part of it) is not installed
            continue
        found += [getattr(module, n) for n in names if isinstance(getattr(module, n, None), type)]
    return tuple(found)


@functools.lru_cache(maxsize=None)
def train_only_types() -> tuple[type, ...]:
    """The classes of ``TRAIN_ONLY_CLASSES`` that can be imported here."""
    return _importable(TRAIN_ONLY_CLASSES)


@functools.lru_cache(maxsize=None)
def cond_conv_types() -> tuple[type, ...]:
    """timm's ``CondConv2d`` (expert weights mixed per sample), if timm is installed."""
    try:
        from timm.layers.cond_conv2d import CondConv2d
    except Exception:
        return ()
    return (CondConv2d,)


def is_cond_conv(module: nn.Module) -> bool:
    """A conv with one weight per expert, shaped ``(experts, out * in/groups * k...)``."""
    return isinstance(module, cond_conv_types())


def is_gatable(module: nn.Module) -> bool:
    """Linear, ConvNd, ConvTransposeNd (subclasses included), timm's CondConv2d and the
    classes of ``registry.register_layer``."""
    return isinstance(module, GATABLE_TYPES) or is_cond_conv(module) or \
        layer_spec(module) is not None


def is_norm(module: nn.Module) -> bool:
    """Torch's norms (subclasses included) and the norms and scales of EXTRA_NORM_CLASSES."""
    return isinstance(module, NORM_TYPES) or isinstance(module, extra_norm_types())


def maps_zero_to_zero(norm: nn.Module) -> bool:
    """True for norms whose output is zero wherever the input is: RMS norms, ``x * gamma``."""
    if type(norm) is nn.RMSNorm:
        return True
    return (isinstance(norm, extra_norm_types())
            and type(norm).__name__ in ZERO_PRESERVING_NORM_NAMES)


# Linear and conv classes whose forward uses ``weight`` exactly as torch's own layer does.
# Weight standardization (timm's StdConv2d) and other subclasses may mix a row's entries, so
# protection counts every input of theirs as used: a free entry could move the protected ones.
_AS_IS_LINEAR_NAMES = {("torch.nn.modules.linear", "NonDynamicallyQuantizableLinear"),
                       ("timm.layers.linear", "Linear"), ("timm.layers.conv2d_same", "Conv2dSame")}


def uses_weight_as_is(layer: nn.Module) -> bool:
    """The layer computes with its weight unchanged, so each entry touches one input feature."""
    cls = type(layer)
    if layer_spec(layer) is not None:  # registered as a linear map
        return True
    if cls in (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
               nn.ConvTranspose3d) or is_cond_conv(layer):
        return True
    return (cls.__module__, cls.__name__) in _AS_IS_LINEAR_NAMES


def normalizes_each_unit(norm: nn.Module) -> bool:
    """True when the norm's statistics never mix units (channels): BatchNorm, InstanceNorm,
    GroupNorm with one channel per group.

    Only behind such a norm can a gate sit: behind LayerNorm or grouped GroupNorm, the units a
    task leaves free would still move the statistics of the units it uses.
    """
    if isinstance(norm, (_BatchNorm, _InstanceNorm)):
        return True
    return isinstance(norm, nn.GroupNorm) and norm.num_groups == norm.num_channels


def norm_channel_dim(norm: nn.Module, x: torch.Tensor) -> int:
    """The dim of ``x`` that ``norm`` keeps apart: 0 for an unbatched InstanceNorm input, else 1."""
    if isinstance(norm, _InstanceNorm) and x.ndim == norm._get_no_batch_dim():
        return 0
    return 1


def gate_behind_norm(norm: nn.Module, x: torch.Tensor, unit_dim: int) -> bool:
    """Whether a gate on ``unit_dim`` of ``x`` may sit behind ``norm``: only when the norm's
    channel dim is that very dim (a Linear on ``(B, L, F)`` before ``BatchNorm1d(L)`` is not)."""
    return x.ndim > 0 and unit_dim % x.ndim == norm_channel_dim(norm, x)


def has_hooks(module: nn.Module) -> bool:
    """Whether the user registered forward or backward hooks on ``module`` (they run only when
    the module itself is called, so hatconvert must not fold it away)."""
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks)


def rows_are_units(layer: nn.Module) -> bool:
    """Row ``o`` of the weight belongs to output unit ``o``: Linear and ConvNd (subclasses
    included), not transposed convs (``(in, out/g, ...)``) nor CondConv (one row per expert)."""
    return isinstance(layer, (nn.Linear, _ConvNd)) and not getattr(layer, "transposed", False) \
        and not is_cond_conv(layer) and layer_spec(layer) is None


def gate_node(graph: "torch.fx.Graph", gate_path: str, task: Any, scale: Any) -> Any:
    """A graph node that calls the gate at ``gate_path`` with the task id and mask scale."""
    return graph.call_module(gate_path, (task, scale))


def input_features(layer: nn.Module) -> int:
    """Number of input features (channels) a gated layer reads."""
    spec = layer_spec(layer)
    if spec is not None:
        return layer.weight.shape[spec.input_axis]
    return getattr(layer, "in_features", None) or layer.in_channels


def updates_statistics(module: nn.Module) -> bool:
    """Whether a forward in training mode changes the module's state (running statistics)."""
    return isinstance(module, (_BatchNorm, _InstanceNorm)) and module.track_running_stats


def output_units(module: nn.Module) -> int:
    """Number of output units a gate of this layer has."""
    spec = layer_spec(module)
    if spec is not None:
        return module.weight.shape[spec.unit_axis]
    if isinstance(module, nn.Linear):
        return module.out_features
    return module.out_channels


def unit_dim(module: nn.Module) -> int:
    """The dim of the layer's output that holds its units: channels for convs, last for Linear."""
    spec = layer_spec(module)
    if spec is not None:
        return spec.feature_dim
    return -1 if isinstance(module, nn.Linear) else 1


def own_tensors(module: nn.Module) -> int:
    """Number of parameter and buffer elements in ``module`` and its children."""
    return sum(t.numel() for t in module.parameters()) + sum(b.numel() for b in module.buffers())


class TaskIndexed(nn.Module):
    """One copy of a module per task; ``task_id`` picks the copy that runs.

    Used for norms (affine parameters and running statistics per task), heads and leaves whose
    weights hatconvert cannot gate. Each copy starts as an exact copy of the original module.
    """

    def __init__(self, module: nn.Module, num_tasks: int, copies: list[nn.Module] | None = None):
        super().__init__()
        if copies is None:
            copies = [copy.deepcopy(module) for _ in range(num_tasks)]
        self.copies = nn.ModuleList(copies)

    def forward(self, *args: Any, task_id: int, gate: torch.Tensor | None = None,
                gate_dim: int = 1, **kwargs: Any) -> Any:
        """Run task ``task_id``'s copy; ``gate`` (of the layer before a norm) on ``gate_dim``.

        The gate goes behind the norm when the norm keeps that dim's units apart (folded into
        an exact BatchNorm's affine), else before it, where the norm mixes the units.
        """
        module = self.copies[task_id]
        if gate is None:
            return module(*args, **kwargs)
        x = args[0]
        if not gate_behind_norm(module, x, gate_dim):
            return module(apply_gate(x, gate, gate_dim), *args[1:], **kwargs)
        if can_fold_into_norm(module) and not has_hooks(module):
            return gated_batch_norm(module, x, gate)
        return apply_gate(module(*args, **kwargs), gate, norm_channel_dim(module, x))


class TaskParameter(nn.Module):
    """One copy per task of a loose parameter (``pos_embed``, ``cls_token``, ``gamma``)."""

    def __init__(self, param: torch.Tensor, num_tasks: int):
        super().__init__()
        self.copies = nn.ParameterList(
            [nn.Parameter(param.detach().clone(), requires_grad=param.requires_grad)
             for _ in range(num_tasks)])

    def forward(self, task_id: int) -> torch.Tensor:
        """Task ``task_id``'s copy of the parameter."""
        return self.copies[task_id]
