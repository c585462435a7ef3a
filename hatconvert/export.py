"""``export``: one task of a HAT network as plain weights of the original architecture.

Task ``t``'s hard masks are folded into the weights (a closed unit's weight row, or its norm's
affine, becomes zero), and task ``t``'s copies of norms, heads, leaves and loose parameters are
picked, so the original model, created with task ``t``'s class count, computes what the HAT
network computes for task ``t``: no hatconvert needed to deploy it.
"""

from __future__ import annotations

import json
import os

import torch
from torch import nn
from torch.nn.modules.conv import _ConvTransposeNd

from .checkpoint import check_target, write_atomic, write_safetensors
from .errors import ExportError, TaskError
from .layers import gate_behind_norm, is_cond_conv
from .registry import layer_spec
from .network import HATNetwork
from .pruned import export_program
from .layout import GATES, Layout

__all__ = ['task_state', 'scale_units', 'fold_into_norm', 'gates_behind_norms', 'fold_masks',
           'fold_into_weight_norm', 'check_tied', 'export']


def task_state(net: HATNetwork, t: int) -> dict[str, torch.Tensor]:
    """Task ``t``'s tensors under the original model's names (gates left out), as copies."""
    layout = net.layout
    indexed = [Layout.copies_prefix(p) for p in layout.task_indexed_modules()]
    params = {Layout.copies_prefix(new): name
              for name, new in layout.task_indexed_parameters().items()}
    out: dict[str, torch.Tensor] = {}
    for key, value in net.model.state_dict().items():
        if key.startswith(f"{GATES}."):
            continue
        prefix = next((p for p in indexed if key.startswith(p)), None)
        if prefix is not None:
            index, rest = Layout.split_copy_key(key, prefix)
            if index == t:
                out[prefix[:-len("copies.")] + rest] = value.detach().clone()
            continue
        prefix = next((p for p in params if key.startswith(p)), None)
        if prefix is not None:
            if Layout.split_copy_key(key, prefix)[0] == t:
                out[params[prefix]] = value.detach().clone()
            continue
        out[key] = value.detach().clone()
    return out


def scale_units(tensor: torch.Tensor, mask: torch.Tensor, layer: nn.Module,
                path: str) -> torch.Tensor:
    """``tensor`` (a weight or bias of ``layer``) with output unit ``u`` scaled by ``mask[u]``."""
    mask = mask.to(tensor.dtype)
    units = mask.numel()
    spec = layer_spec(layer)
    if spec is not None and tensor.ndim > 1:  # registered: units on spec.unit_axis
        shape = [1] * tensor.ndim
        shape[spec.unit_axis] = units
        return tensor * mask.view(shape)
    if is_cond_conv(layer):  # per expert: weight (experts, out * rest), bias (experts, out)
        shaped = tensor.reshape(tensor.shape[0], units, -1)
        return (shaped * mask.view(1, units, 1)).reshape(tensor.shape)
    if isinstance(layer, _ConvTransposeNd) and tensor.ndim > 1:  # (in, out / groups, *kernel)
        groups = layer.groups
        shaped = tensor.reshape(groups, tensor.shape[0] // groups, *tensor.shape[1:])
        m = mask.reshape(groups, 1, tensor.shape[1], *([1] * (tensor.ndim - 2)))
        return (shaped * m).reshape(tensor.shape)
    if tensor.shape[0] != units:
        raise ExportError(f"cannot fold the gate of layer '{path}' ({type(layer).__name__}): "
                          f"a tensor of shape {tuple(tensor.shape)} has no row per unit of its "
                          f"{units} units")
    return tensor * mask.view(-1, *([1] * (tensor.ndim - 1)))  # Linear, ConvNd: rows


def fold_into_norm(state: dict[str, torch.Tensor], net: HATNetwork, path: str, norm_path: str,
                   t: int, mask: torch.Tensor) -> None:
    """Zero the affine of the norm copy behind layer ``path`` where the mask is closed.

    Valid because a closed unit's normalized value times a zero weight plus a zero bias is
    zero, and the norm's activation (if any) must keep it zero.
    """
    norm = net.model.get_submodule(norm_path).copies[t]
    if getattr(norm, "weight", None) is None or getattr(norm, "bias", None) is None:
        raise ExportError(
            f"cannot fold the gate of layer '{path}' into norm '{norm_path}' "
            f"({type(norm).__name__}): it has no affine weight and bias, so the original "
            "architecture cannot express a closed unit; convert a model whose norm is affine")
    act = getattr(norm, "act", None)
    if isinstance(act, nn.Module):
        try:
            with torch.no_grad():
                zero = act(torch.zeros(1, mask.numel(), 1, 1, dtype=norm.weight.dtype,
                                       device=norm.weight.device))
            keeps_zero = bool(torch.all(zero == 0))
        except Exception:
            keeps_zero = False
        if not keeps_zero:
            raise ExportError(
                f"cannot fold the gate of layer '{path}' into norm '{norm_path}': its "
                f"activation {type(act).__name__} does not map 0 to 0, so a closed unit would "
                "not stay closed in the original architecture")
    for name in ("weight", "bias"):
        key = f"{norm_path}.{name}"
        state[key] = scale_units(state[key], mask, norm, norm_path)


def gates_behind_norms(net: HATNetwork, t: int) -> dict[str, bool]:
    """Per gated layer with a norm after it, whether its gate sits behind the norm.

    A conv's always does; a Linear's only where the norm's channel dim is the Linear's last dim,
    which depends on the input's rank: the network's example input runs once to find out.
    """
    sides = {path: True for path, info in net.layout.gated.items() if info.norm is not None}
    linear = {info.norm: path for path, info in net.layout.gated.items()
              if info.norm is not None and info.unit_dim != 1}
    if not linear:
        return sides
    example = net.example_input()
    if example is None:
        raise ExportError(f"cannot tell on which side of norm '{next(iter(linear))}' the gate "
                          f"of Linear '{linear[next(iter(linear))]}' sits before the network "
                          "has seen an input: run one forward pass, then export")

    def record(norm_path: str):
        def hook(module, args, kwargs):
            sides[linear[norm_path]] = gate_behind_norm(module.copies[t], args[0],
                                                        kwargs.get("gate_dim", 1))
        return hook
    handles = [net.model.get_submodule(n).register_forward_pre_hook(record(n), with_kwargs=True)
               for n in linear]
    training = net.training
    try:
        net.eval()
        with torch.no_grad():
            net(example[0], t, **example[1])
    finally:
        net.train(training)
        for handle in handles:
            handle.remove()
    return sides


def fold_masks(state: dict[str, torch.Tensor], net: HATNetwork, t: int) -> None:
    """Fold task ``t``'s hard mask of every gated layer into ``state`` in place.

    Behind a norm (modes ``norm`` and ``output``) the mask goes into the norm's affine; every
    other gate multiplies the layer's output (``weight``, ``output``, ``function``, ``leaf``),
    which equals the layer with its weight rows and bias scaled.
    """
    gates = net.gates()
    behind = gates_behind_norms(net, t)
    for path, info in net.layout.gated.items():
        mask = gates[path].mask(t).detach()
        if info.behind_norm and behind[path]:
            fold_into_norm(state, net, path, info.norm, t, mask)
            continue
        if getattr(info, "external_bias", False) and not bool(mask.all()):
            raise ExportError(
                f"cannot export task {t}: layer '{path}' is used as F.linear(x, weight, bias) "
                "with a bias that is not its own (beit's q_bias/v_bias), and the task closes "
                "some of its units; the original architecture cannot zero them")
        layer = net.model.get_submodule(path)
        for name in ("weight", "bias"):
            key = f"{path}.{name}"
            if getattr(layer, name, None) is None:
                continue
            if key not in state and f"{path}.parametrizations.{name}.original0" in state:
                fold_into_weight_norm(state, layer, path, name, mask)
                continue
            if key not in state:
                raise ExportError(f"cannot fold the gate of layer '{path}': its {name} is not "
                                  "a plain tensor of the layer")
            state[key] = scale_units(state[key], mask, layer, path)


def fold_into_weight_norm(state: dict[str, torch.Tensor], layer: nn.Module, path: str,
                          name: str, mask: torch.Tensor) -> None:
    """Fold the mask into a weight-normed ``weight = g * v / ||v||`` (torch's ``weight_norm``
    parametrization, wav2vec2's positional conv): the closed units' rows of ``v`` become zero
    and ``g`` is rescaled by the norm they leave, so every open row keeps its value."""
    from torch.nn.utils.parametrizations import _WeightNorm
    chain = layer.parametrizations[name]
    if len(chain) != 1 or not isinstance(chain[0], _WeightNorm):
        raise ExportError(f"cannot fold the gate of layer '{path}': its {name} is computed by "
                          f"a parametrization ({type(chain[0]).__name__}) that the original "
                          "architecture cannot be given a closed unit through")
    g_key, v_key = (f"{path}.parametrizations.{name}.original{i}" for i in (0, 1))
    g, v = state[g_key], state[v_key]
    dim = chain[0].dim
    kept = scale_units(v, mask, layer, path)
    before, after = torch.norm_except_dim(v, 2, dim), torch.norm_except_dim(kept, 2, dim)
    empty = after == 0  # nothing open in this slice: its weight is zero either way
    state[g_key] = torch.where(empty, torch.zeros_like(g), g * after / before.where(~empty, 1))
    state[v_key] = torch.where(empty.expand_as(v), v, kept)


def check_tied(state: dict[str, torch.Tensor], net: HATNetwork) -> None:
    """Tensors that are one tensor in the network must still agree after folding."""
    groups: dict[tuple, list[str]] = {}
    for key, value in net.model.state_dict().items():
        if key in state and value.numel() > 0:
            view = (value.untyped_storage().data_ptr(), value.storage_offset(),
                    tuple(value.shape), value.stride())
            groups.setdefault(view, []).append(key)
    for keys in groups.values():
        for other in keys[1:]:
            if not torch.equal(state[keys[0]], state[other]):
                raise ExportError(
                    f"cannot export: '{keys[0]}' and '{other}' are one tied tensor in the "
                    "model, but the task's masks scale them differently")


def export(net: HATNetwork, task_id: int, path: str | os.PathLike | None = None, *,
           model: nn.Module | None = None, allow_untrained: bool = False, prune: bool = False
           ) -> dict[str, torch.Tensor] | torch.export.ExportedProgram:
    """Task ``task_id`` as a plain state dict of the original model; written to ``path`` if given.

    ``prune=True`` returns (and writes, as ``.pt2``) a ``torch.export`` program instead, without
    the units the task leaves closed (pruned.py): it runs with plain PyTorch.

    The keys are exactly those of the original model's ``state_dict()``; create that model with
    the task's class count and ``load_state_dict`` the result. ``model`` (the original) supplies
    tensors the traced forward never used, which the HAT network does not hold. An untrained
    task is refused unless ``allow_untrained`` (its masks are the initial embeddings' signs).
    The file is written atomically, with the mode a new file gets (or the replaced file's).
    """
    if not isinstance(net, HATNetwork):
        raise ExportError(f"export expects a HATNetwork, got {type(net).__name__}")
    target = None if path is None else check_target(path)  # before any work: read-only, no dir
    _check_format(path, prune)
    t = net.check_task_id(task_id)
    if t == net.active_task:
        raise TaskError(f"task {t} is being trained: call end_task() before exporting it")
    if not bool(net.trained[t]) and not allow_untrained:
        raise TaskError(f"task {t} is not trained (trained tasks: {net.trained_tasks()}); "
                        "pass allow_untrained=True to export its initial masks anyway")
    if prune:
        return export_program(net, t, target)
    state = task_state(net, t)
    fold_masks(state, net, t)
    check_tied(state, net)
    keys = net.layout.original_keys or list(state)
    missing = [k for k in keys if k not in state]
    if missing:
        if model is None:
            raise ExportError(
                f"the HAT network does not hold {', '.join(missing[:5])}"
                f"{', ...' if len(missing) > 5 else ''} of the original model (its forward "
                "never uses them, so the conversion dropped them): pass the original as model=")
        reference = model.state_dict()
        absent = [k for k in missing if k not in reference]
        if absent:
            raise ExportError(f"model= does not hold {', '.join(absent[:5])}: pass the model "
                              "that was converted")
        for key in missing:
            state[key] = reference[key].detach().clone()
    result = {k: state[k].contiguous() for k in keys}
    if target is not None:
        meta = {"format": "pt", "hatconvert_task": str(t),
                "hatconvert_source": json.dumps(net.config.get("source"), default=str)}
        write_atomic(target, lambda tmp: write_safetensors(result, tmp, meta, target))
    return result


def _check_format(path: str | os.PathLike | None, prune: bool) -> None:
    """A file name that promises another format than the one ``prune`` writes is refused."""
    suffix = os.path.splitext(str(path))[1].lower() if path is not None else ""
    if not prune and suffix in (".pt2", ".onnx"):
        raise ExportError(f"{path} names a {suffix} file, which only the pruned export writes: "
                          "pass prune=True (--prune), or a .safetensors name for the weights")
    if prune and suffix == ".safetensors":
        raise ExportError(f"the pruned export writes a torch.export program, not {path}: "
                          "name it .pt2 (or .onnx)")
