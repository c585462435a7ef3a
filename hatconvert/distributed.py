"""Training a HAT network in several processes with ``DistributedDataParallel``.

DDP averages gradients, and the gradient hooks, the embedding compensation and the step guard
act on each rank before and after that, the same on every rank. Three things need help:

* a task's forward leaves the other tasks' heads, norm copies and task parameters without a
  gradient, which DDP accepts only with ``find_unused_parameters=True``, and ``static_graph``
  would stop reducing a parameter that a later task uses: both are refused here by name;
* ``begin_task`` draws the task's embeddings from each rank's own generator: the first
  training forward of a task broadcasts them from rank 0, so ranks seeded apart agree;
* ``begin_task(reinit_free=True)`` draws the free units from each rank's generator too: the
  same forward broadcasts the gated weights from rank 0 (the entries trained tasks use are
  equal on every rank already);
* norm statistics are each rank's own (DDP copies rank 0's buffers before every forward):
  ``end_task`` averages the task's statistics over the ranks.

The wrapper is found at the first training forward of each task, from the call stack (the net
cannot see who calls it). Sharded wrappers (FSDP, ``fully_shard``) are refused: the guard keeps
and restores whole weights, which a shard is not.
"""

from __future__ import annotations

import sys
import weakref
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .errors import DistributedError
from .protection import shared_weights

if TYPE_CHECKING:
    from .network import HATNetwork

__all__ = ["on_training_forward", "on_end_task", "refuse_sharded", "wrapper_of"]

_FRAMES = 40  # how far up the stack a wrapper's forward may be (Lightning nests a few calls)


def _running() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def wrapper_of(net: nn.Module) -> nn.Module | None:
    """The ``DistributedDataParallel`` whose forward is running ``net``'s, if any."""
    from torch.nn.parallel import DistributedDataParallel
    frame = sys._getframe(1)
    for _ in range(_FRAMES):
        if frame is None:
            return None
        owner = frame.f_locals.get("self")
        if isinstance(owner, DistributedDataParallel) and _holds(owner.module, net):
            return owner
        frame = frame.f_back
    return None


def _holds(module: nn.Module, net: nn.Module) -> bool:
    return module is net or any(m is net for m in module.modules())


def on_training_forward(net: "HATNetwork", t: int) -> None:
    """At the first training forward of task ``t`` under DDP: check the wrapper's options and
    give every rank rank 0's embeddings of ``t``. Until a DDP is found, every training forward
    looks again (a first forward may run outside the wrapper)."""
    if not _running() or net._distributed_task == t:
        return
    if net._sharding_checked != t:
        refuse_sharded(net)  # wrapped after begin_task
        net._sharding_checked = t
    ddp = wrapper_of(net)
    if ddp is None:
        return
    _check_options(net, ddp)
    net._distributed_task = t
    net._ddp = weakref.ref(ddp)
    with torch.no_grad():
        for gate in net.gates().values():
            row = gate.embedding.data[t].clone()
            torch.distributed.broadcast(row, src=_rank0(ddp), group=ddp.process_group)
            gate.embedding.data[t].copy_(row)
        if net._redrawn:
            for tensor in shared_weights(net).values():
                torch.distributed.broadcast(tensor.data, src=_rank0(ddp), group=ddp.process_group)
            net._redrawn = False


def _rank0(ddp: nn.Module) -> int:
    """The global rank of the process group's first rank."""
    group = ddp.process_group
    return torch.distributed.get_global_rank(group, 0) if group is not None else 0


def _check_options(net: "HATNetwork", ddp: nn.Module) -> None:
    per_task = _per_task_parameters(net)
    if not per_task or net.num_tasks == 1:
        return
    if getattr(ddp, "static_graph", False):
        raise DistributedError(
            "DistributedDataParallel(..., static_graph=True) wraps this HAT network: each task "
            f"uses its own heads and norm copies ({per_task[0]}, ...), so the set of parameters "
            "with a gradient changes from task to task and a static graph would stop averaging "
            "some of them; wrap it with static_graph=False and find_unused_parameters=True")
    if not getattr(ddp, "find_unused_parameters", False):
        raise DistributedError(
            "DistributedDataParallel wraps this HAT network without find_unused_parameters="
            f"True: a task's forward leaves the other tasks' heads and norm copies ({per_task[0]}"
            ", ...) without a gradient, which DDP refuses at the next step; wrap it as "
            "DistributedDataParallel(net, find_unused_parameters=True)")


def _per_task_parameters(net: "HATNetwork") -> list[str]:
    """Names of trainable parameters that belong to one task only (other tasks' copies)."""
    layout, names = net.layout, []
    for path in layout.task_indexed_modules():
        for name, p in net.model.get_submodule(path).copies[0].named_parameters():
            if p.requires_grad:
                names.append(f"{path}.copies.0.{name}")
    for new_path in layout.task_indexed_parameters().values():
        if net.model.get_submodule(new_path).copies[0].requires_grad:
            names.append(f"{new_path}.copies.0")
    return names


def on_end_task(net: "HATNetwork", t: int) -> None:
    """Average task ``t``'s norm statistics over the ranks of the DDP that trained it."""
    ref = getattr(net, "_ddp", None)
    ddp = ref() if ref is not None else None
    net._distributed_task = net._sharding_checked = net._ddp = None
    if ddp is None or not _running():
        return
    group, size = ddp.process_group, torch.distributed.get_world_size(ddp.process_group)
    with torch.no_grad():
        for path in net.layout.task_indexed_modules():
            for buffer in net.model.get_submodule(path).copies[t].buffers():
                if buffer.is_floating_point():
                    total = buffer.detach().clone()
                    torch.distributed.all_reduce(total, group=group)
                    torch.distributed.broadcast(total, src=_rank0(ddp), group=group)
                    buffer.copy_(total / size)


def refuse_sharded(net: "HATNetwork") -> None:
    """Refuse FSDP and ``fully_shard``: their parameters are shards or flat views."""
    for name, p in net.named_parameters():
        if type(p).__name__ == "DTensor" or getattr(p, "_is_flat_param", False) \
                or hasattr(p, "_fsdp_flattened"):
            raise DistributedError(
                f"parameter '{name}' is sharded (FSDP or fully_shard): the protection of trained "
                "tasks keeps and restores entries of whole weights and scales their gradients "
                "by masks laid out like them, which a shard or a flattened view is not; train "
                "a HAT network with DistributedDataParallel(net, find_unused_parameters=True)")


def state_without_wrapper(state: dict[str, Any]) -> dict[str, Any]:
    """A copy or pickle keeps no reference to the DDP that trained the original."""
    state.update(_ddp=None, _distributed_task=None, _sharding_checked=None)
    return state
