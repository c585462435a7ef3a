"""Every torch optimizer step passes through here: the hooks that connect steps to networks.

torch's global optimizer-step hooks cover any ``torch.optim`` optimizer a user keeps across
tasks. Before a step, each live HAT network sees it (``check_step``): a pending task is armed,
and a step that would change a trained task while no task is active is refused before anything
changes. After a step, each armed guard that owns one of the optimizer's parameters puts the
protected entries back (``protection.Guard``).
"""

from __future__ import annotations

import warnings
import weakref
from typing import TYPE_CHECKING

import torch
from torch.optim.optimizer import (register_optimizer_step_post_hook,
                                   register_optimizer_step_pre_hook)

from .errors import TaskError

if TYPE_CHECKING:
    from .network import HATNetwork

__all__ = ['watch', 'ensure_step_hooks', 'check_step']

_networks: "weakref.WeakSet[HATNetwork]" = weakref.WeakSet()
_step_hooks: tuple | None = None
# networks whose protection a step's closure arms (its forward): checked after the step
_armed_by_closure: "weakref.WeakSet[HATNetwork]" = weakref.WeakSet()


def watch(network: "HATNetwork") -> None:
    """Have every optimizer step call ``network.before_step`` first."""
    ensure_step_hooks()
    _networks.add(network)


def ensure_step_hooks() -> None:
    """Register torch's global optimizer-step hooks once."""
    global _step_hooks
    if _step_hooks is None:
        _step_hooks = (register_optimizer_step_pre_hook(_before_any_step),
                       register_optimizer_step_post_hook(_after_any_step))


def _after_any_step(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    from .protection import restore_after_step
    restore_after_step(optimizer)
    for network in list(_armed_by_closure):
        _armed_by_closure.discard(network)
        if network.active_task is not None and network._guard is None:
            raise TaskError(
                f"the optimizer step's closure ran no forward of the HAT network, so task "
                f"{network.active_task}'s protection of the trained tasks "
                f"{network.trained_tasks(excluding=network.active_task)} was never armed and the "
                "step may have changed them; run one forward (net(x, t, s)) after begin_task "
                "before stepping with such a closure")


def _before_any_step(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    ids = {id(p) for group in optimizer.param_groups for p in group["params"]}
    closure = args[1] if len(args) > 1 else kwargs.get("closure")  # args[0] is the optimizer
    for network in list(_networks):
        check_step(network, optimizer, ids, network.parameter_ids(), closure is not None)


def check_step(net: "HATNetwork", optimizer: torch.optim.Optimizer, ids: set[int],
               mine: set[int], closure: bool = False) -> None:
    """Arm a pending task, refuse a step that would change a trained task while none is
    active, and warn about an optimizer that holds none of ``net``'s parameters while it trains.

    A step changes only parameters that have a gradient (torch's optimizers skip the others,
    weight decay included), so only those count, unless the step is given a closure: that
    computes the gradients inside the step, after this check. ``ids`` are the optimizer's
    parameters, ``mine`` the network's.
    """
    if not ids & mine:
        _warn_foreign_optimizer(net, optimizer)
        return
    changes = closure or any(p.grad is not None and id(p) in mine
                             for group in optimizer.param_groups for p in group["params"])
    if net.active_task is not None:
        stale = net._guard is not None and net._guard.param_ids != mine
        if net._guard is None and closure and net._needs_arming and not net.has_example():
            _armed_by_closure.add(net)  # a fresh copy (a spawned process): the closure's
            return                      # forward sees the first input and arms, before backward
        if (net._guard is None or stale) and changes:
            net._arm_or_abort()  # parameters replaced mid-task (.to() with overwrite): anew
        return
    if bool(net.trained.any()) and changes:
        raise TaskError(
            f"optimizer step over the HAT network's parameters while no task is active: it "
            f"would change the trained tasks {net.trained_tasks()}; call net.begin_task(t) "
            "before training task t (the step was not taken)")


def _warn_foreign_optimizer(net: "HATNetwork", optimizer: torch.optim.Optimizer) -> None:
    if net.active_task is None or id(optimizer) in net._warned_optimizers:
        return
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if params and all(p.grad is None for p in params):
        net._warned_optimizers.add(id(optimizer))
        warnings.warn(
            f"an optimizer step ran while task {net.active_task} trains, over {len(params)} "
            "parameters none of which has a gradient and none of which belongs to the HAT "
            "network: was the optimizer built on the original model? Build it from "
            "net.parameters()", RuntimeWarning, stacklevel=5)
