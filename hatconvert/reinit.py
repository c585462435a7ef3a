"""Fresh weights for the units no trained task uses, before a task begins (``reinit_free``).

Every task trains the whole network while its gates are soft, so the units the earlier tasks
left closed drift with them: by the tenth task of a sequence they hold weights shaped by nine
tasks that did not keep them. Drawing them again, as at initialisation, gives each task the
free units a network of its own would start from. Only entries no trained task reads change:
the weights and bias of a gated unit whose cumulative mask is zero, in trainable parameters.
The draw is the layer's own ``reset_parameters()`` (torch's global generator), so it suits
networks trained from random initialisation; a pretrained network's free units would lose
their pretrained weights.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from .errors import TaskError
from .layers import input_features
from .protected import protection_of

if TYPE_CHECKING:
    from .network import HATNetwork

__all__ = ["free_entries", "redraw_free_units"]


def free_entries(layer: nn.Module, used: torch.Tensor
                 ) -> dict[str, torch.Tensor]:
    """Per trainable parameter of ``layer`` (``weight``, ``bias``), the boolean positions that
    belong to units ``used`` leaves at zero; parameters without such positions are left out."""
    ones = torch.ones(input_features(layer), device=used.device)
    weight, bias = protection_of(layer, used, ones)
    out = {}
    for name, protection in (("weight", weight), ("bias", bias)):
        param = getattr(layer, name, None)
        if protection is None or not isinstance(param, nn.Parameter) or not param.requires_grad:
            continue
        free = protection.dense() == 0
        if bool(free.any()):
            out[name] = free
    return out


def redraw_free_units(net: "HATNetwork", tasks: list[int]) -> int:
    """Redraw the weights of every gated unit none of ``tasks`` uses; return how many units.

    Every layer is checked before any changes: a layer with free units and no
    ``reset_parameters()`` is refused, naming it."""
    gates = net.gates()
    plan = []
    for path in net.layout.gated:
        layer = net.model.get_submodule(path)
        used = gates[path].cumulative(tasks)
        free = free_entries(layer, used.to(layer.weight.device))
        if not free:
            continue
        if not callable(getattr(layer, "reset_parameters", None)):
            raise TaskError(f"reinit_free: the gated layer {path!r} ({type(layer).__name__}) "
                            "has no reset_parameters(), so its free units cannot be drawn "
                            "again; begin the task without reinit_free")
        plan.append((path, layer, free, int((used == 0).sum())))
    for _, layer, free, _ in plan:
        _redraw(layer, free)
    return sum(units for *_, units in plan)


def _redraw(layer: nn.Module, free: dict[str, torch.Tensor]) -> None:
    """Draw all of ``layer``'s tensors again, then put back every entry not in ``free``."""
    with torch.no_grad():
        tensors = dict(layer.named_parameters())
        tensors.update(layer.named_buffers())
        kept = {name: tensor.detach().clone() for name, tensor in tensors.items()}
        layer.reset_parameters()
        for name, tensor in tensors.items():
            where = free.get(name)
            tensor.copy_(kept[name] if where is None else torch.where(where, tensor, kept[name]))
