"""Keeping earlier tasks fixed while a later task trains.

This module answers "what keeps task ``t`` fixed": ``arm_task`` decides what to protect for
the active task and arms three mechanisms (``begin_task`` arms, ``end_task`` removes them):

* gradient hooks scale the gradient of every gated weight ``w[o, i]`` by the adjustment rate
  ``1 - min(M_out[o], M_in[i])`` (and a bias ``b[o]`` by ``1 - M_out[o]``);
* an optimizer step post-hook (torch's global one, so any ``torch.optim`` optimizer kept across
  tasks is covered) puts every protected entry back to its value at ``begin_task``: momentum,
  Adam moments and weight decay move parameters whose gradient is zero, so hooks alone leak;
  the same hook clamps the active task's embeddings to ``[-6, 6]``;
* an embedding gradient hook applies HAT's compensation for the mask scale of the forward pass.
"""

from __future__ import annotations

import warnings
import weakref
from typing import TYPE_CHECKING, Callable, Iterable

import torch
from torch import nn

from .held import Block, Held, hold
from .protected import protection_of, rate_hook

if TYPE_CHECKING:
    from .gates import HATGate
    from .network import HATNetwork

__all__ = ['EMBEDDING_CLAMP', 'COMPENSATION_CLAMP', 'compensate', 'Guard', 'arm_task',
           'shared_weights', 'protect_gated', 'held_whole', 'compensation_hook',
           'clamp_embeddings', 'restore_after_step']
EMBEDDING_CLAMP = 6.0
COMPENSATION_CLAMP = 50.0


def compensate(grad: torch.Tensor, embedding: torch.Tensor, s: float, s_max: float) -> torch.Tensor:
    """HAT's embedding gradient compensation for a forward pass at mask scale ``s``."""
    wide = torch.promote_types(grad.dtype, torch.float32)  # cosh(50) overflows float16
    e = embedding.detach().to(wide)
    num = torch.cosh(torch.clamp(s * e, -COMPENSATION_CLAMP, COMPENSATION_CLAMP)) + 1.0
    out = grad.to(wide) * (s_max / s) * num / (torch.cosh(e) + 1.0)
    if wide != grad.dtype:  # a half-precision gradient: keep it finite
        limit = torch.finfo(grad.dtype).max
        out = out.clamp(-limit, limit)
    return out.to(grad.dtype)



class Guard:
    """The armed protection of one network during one task.

    ``shared`` are the gated weights and biases, by name: after each step any non-finite entry
    in them is set to 0, because an earlier task reads a free entry as ``w * 0`` (its input is
    zero there) and ``nan * 0`` is NaN.
    """

    def __init__(self, params: Iterable[nn.Parameter], after_step: Callable[[], None],
                 shared: dict[str, torch.Tensor] | None = None, task_id: int | None = None):
        self.param_ids = {id(p) for p in params}
        self.held: list[Held] = []
        self.handles: list[torch.utils.hooks.RemovableHandle] = []
        self.hook_bytes = 0  # what the gradient hooks keep: their protections' factors
        self.shared = shared or {}
        self.task_id = task_id
        self._after_step = after_step

    def nbytes(self) -> int:
        """Memory the armed protection holds: held values, their positions, hook factors."""
        return sum(item.nbytes() for item in self.held) + self.hook_bytes

    def owns(self, optimizer: torch.optim.Optimizer) -> bool:
        """Whether ``optimizer`` steps any parameter of this guard's network."""
        return any(id(p) in self.param_ids for group in optimizer.param_groups
                   for p in group["params"])

    def after_step(self) -> None:
        """After an optimizer step: restore held entries, zero non-finite shared ones, clamp."""
        with torch.no_grad():
            self.restore()
            self._zero_non_finite()
            self._after_step()

    def restore(self) -> None:
        """Put every held entry back: after a step, and wherever something outside a hooked
        step may have moved one (an optimizer wrapper, a manual edit)."""
        with torch.no_grad():
            for item in self.held:
                item.restore()

    def _zero_non_finite(self) -> None:
        if not self.shared:
            return
        tensors = list(self.shared.values())
        # fast path: a sum is finite unless an entry is not (or the sum overflows: then check)
        if bool(torch.stack([t.detach().sum(dtype=torch.float32) for t in tensors])
                .isfinite().all()):
            return
        finite = torch.stack([torch.isfinite(t).all() for t in tensors])
        if bool(finite.all()):
            return
        names = [name for name, ok in zip(self.shared, finite.tolist()) if not ok]
        for name in names:
            tensor = self.shared[name]
            tensor.data.masked_fill_(~torch.isfinite(tensor.data), 0.0)
        warnings.warn(f"training task {self.task_id} diverged: the optimizer step left NaN or "
                      f"inf in {', '.join(names[:5])}{', ...' if len(names) > 5 else ''}; those "
                      "entries were set to 0 so that trained tasks stay exact (lower the "
                      "learning rate, or clip gradients)", RuntimeWarning, stacklevel=3)

    def arm(self) -> None:
        """Make every optimizer step restore this guard's entries."""
        from .steps import ensure_step_hooks
        ensure_step_hooks()
        _armed.add(self)

    def disarm(self) -> None:
        """Remove the hooks and release the held copies."""
        _armed.discard(self)
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self.held.clear()


_armed: "weakref.WeakSet[Guard]" = weakref.WeakSet()  # the step hooks restore these


# -- what keeps the trained tasks fixed while task t trains ----------------------------------
def arm_task(net: "HATNetwork") -> Guard:
    """Build and arm the guard of ``net``'s active task: gradient hooks and held entries of the
    gated weights other tasks use, their embeddings, copies and frozen tensors, the embedding
    compensation, and the check of shared weights for NaN. Nothing stays armed if it fails."""
    t, opts = net.active_task, net._options
    others = net.trained_tasks(excluding=t)
    gates = net.gates()
    guard = Guard(net.parameters(), after_step=lambda: clamp_embeddings(gates, t),
                  shared=shared_weights(net) if others else {}, task_id=t)
    try:
        if others and opts["adjustment"] != "hat_const_1":
            protect_gated(net, guard, gates, others, t, opts)
        rows = torch.tensor(sorted(others), dtype=torch.long)
        for gate in gates.values():
            guard.held.append(hold(gate.embedding, Block(0, rows.to(gate.embedding.device))))
            if gate.embedding.requires_grad:
                guard.handles.append(gate.embedding.register_hook(
                    compensation_hook(net, gate.embedding)))
        for tensor in held_whole(net, others):
            guard.held.append(hold(tensor))
    except BaseException:
        guard.disarm()
        raise
    guard.held = [h for h in guard.held if h is not None]
    guard.arm()
    return guard


def shared_weights(net: "HATNetwork") -> dict[str, torch.Tensor]:
    """The gated weights and biases by name: the only tensors every task reads."""
    out = {}
    for path in net.layout.gated:
        layer = net.model.get_submodule(path)
        for name in ("weight", "bias"):
            if isinstance(getattr(layer, name, None), torch.Tensor):
                out[f"{path}.{name}"] = getattr(layer, name)
    return out


def protect_gated(net: "HATNetwork", guard: Guard, gates: dict[str, "HATGate"],
                  others: list[int], t: int, opts: dict) -> None:
    """Gradient hooks and held entries for the gated weights the other tasks use."""
    out = {path: gate.cumulative(others) for path, gate in gates.items()}
    inputs = net.input_masks(out, t)
    for path in net.layout.gated:
        layer = net.model.get_submodule(path)
        protect_w, protect_b = protection_of(layer, out[path], inputs[path])
        bias = getattr(layer, "bias", None)  # a registered layer may have none
        for param, protect in ((layer.weight, protect_w), (bias, protect_b)):
            if protect is None or not protect.any():
                continue
            if param.requires_grad:  # a frozen parameter gets no gradient to scale
                guard.handles.append(param.register_hook(
                    rate_hook(protect, opts["adjustment"], opts["alpha"])))
                guard.hook_bytes += protect.nbytes()
            fixed = opts["adjustment"] == "hat" or (opts["adjustment"] == "hat_const_alpha"
                                                    and opts["alpha"] == 0)
            if fixed or not param.requires_grad:
                guard.held.append(hold(param, protect.positions()))


def held_whole(net: "HATNetwork", others: list[int]) -> list[torch.Tensor]:
    """Tensors other trained tasks own outright: their copies, and frozen tensors."""
    layout, model = net.layout, net.model
    tensors = []
    for path in layout.task_indexed_modules():
        copies = model.get_submodule(path).copies
        for o in others:
            tensors += list(copies[o].parameters()) + [
                b for b in copies[o].buffers() if b.is_floating_point()]
    for new_path in layout.task_indexed_parameters().values():
        copies = model.get_submodule(new_path).copies
        tensors += [copies[o] for o in others]
    if others:
        for path in layout.frozen_leaves:
            module = model.get_submodule(path)
            tensors += list(module.parameters()) + [
                b for b in module.buffers() if b.is_floating_point()]
        for name in layout.frozen_parameters():
            tensors.append(model.get_parameter(name))
        for name in layout.frozen_tensors:  # inside converted leaves, written buffers
            owner, _, attr = name.rpartition(".")
            tensor = getattr(model.get_submodule(owner), attr)
            if isinstance(tensor, torch.Tensor) and tensor.is_floating_point():
                tensors.append(tensor)
    return tensors


def compensation_hook(net: "HATNetwork", embedding: torch.Tensor
                      ) -> Callable[[torch.Tensor], torch.Tensor]:
    """HAT's compensation for the mask scale of ``net``'s last training forward."""
    def hook(grad: torch.Tensor) -> torch.Tensor:
        if net._last_scale is None:
            return grad
        return compensate(grad, embedding, net._last_scale, net._options["s_max"])
    return hook


def clamp_embeddings(gates: dict[str, "HATGate"], t: int) -> None:
    """Clamp task ``t``'s embeddings to ``[-6, 6]`` after a step (HAT's rule)."""
    for gate in gates.values():
        gate.embedding.data[t].clamp_(-EMBEDDING_CLAMP, EMBEDDING_CLAMP)


def restore_after_step(optimizer: torch.optim.Optimizer) -> None:
    """After any optimizer step: every armed guard that owns its parameters acts."""
    for guard in list(_armed):
        if guard.owns(optimizer):
            guard.after_step()
