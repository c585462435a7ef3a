"""HAT's sparsity penalty, with a floor that keeps every gated layer open.

HAT's penalty pulls every free unit's gate towards 0 with the same strength. Where a norm
downstream hides the common scale of a layer's gates from the loss (``BN(conv(relu(a * h)))``:
the loss is the same for ``a`` and ``2a``), the task's gradient has no component that resists
shrinking all of that layer's gates together. Under Adam-type optimizers, which move every
embedding by about the learning rate per step, the penalty then shuts the whole layer in a few
hundred steps, and the task is at chance (benchmarks/continual_digits.py --study). The floor:
each layer's ``ceil(keep_open * units)`` most open units are pulled open instead of shut, so no
task can close a layer, while the rest of the layer is penalised as in the paper.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from .errors import OptionError
from .gates import soft_gate
from .options import check_regularization

if TYPE_CHECKING:
    from .gates import HATGate

__all__ = ['KEEP_OPEN', 'check_keep_open', 'kept_open', 'sparsity_penalty']

# The share of each gated layer's units that the penalty keeps open (at least one unit). 5 % costs
# little: trained long, tasks settle at this floor in the layers a norm hides from the loss.
KEEP_OPEN = 0.05


def check_keep_open(keep_open: Any) -> None:
    """The floor must be a fraction in ``[0, 1]`` (0 turns it off: the paper's penalty)."""
    if isinstance(keep_open, bool) or not isinstance(keep_open, (int, float)) \
            or not 0 <= keep_open <= 1:
        raise OptionError(f"keep_open must be a fraction of each layer's units in [0, 1], "
                          f"got {keep_open!r}")


def kept_open(embedding: torch.Tensor, keep_open: float) -> torch.Tensor:
    """1.0 at the ``ceil(keep_open * units)`` largest embeddings of one layer, 0.0 elsewhere."""
    k = math.ceil(keep_open * embedding.shape[0])
    keep = torch.zeros_like(embedding)
    if k:
        keep[embedding.detach().topk(k).indices] = 1.0
    return keep


def sparsity_penalty(gates: list["HATGate"], t: int, others: list[int],
                     mask_scale: float | torch.Tensor, c: float = 0.75, mode: str = "original",
                     keep_open: float = KEEP_OPEN) -> torch.Tensor:
    """``c`` times HAT's penalty on task ``t``'s soft gates: the gates of the units no task in
    ``others`` uses, over their number (``cross`` also rewards reusing the units they use;
    ``total``: over the number of all units, so a new unit costs every task the same, where
    the paper's price rises as the free units get fewer).

    The ``keep_open`` floor swaps the penalty ``a`` of each layer's most open units for
    ``1 - a`` (same strength, opposite pull); ``keep_open=0`` is the paper's penalty.
    """
    check_regularization(c, mode)
    check_keep_open(keep_open)
    free_sum = used_sum = torch.zeros(())  # a tensor even for a network with no gated layer
    free_count = used_count = all_count = 0.0
    for gate in gates:
        e = gate.embedding[t]
        a = soft_gate(e, mask_scale)
        used = gate.cumulative(others)
        keep = kept_open(e, keep_open)
        free_sum = free_sum + (a * (1 - used) * (1 - keep)).sum() + (keep * (1 - a)).sum()
        free_count += float((1 - used).sum())
        used_sum = used_sum + (a * used).sum()
        used_count += float(used.sum())
        all_count += float(used.numel())
    reg = free_sum / max(all_count if mode == "total" else free_count, 1.0)  # every unit used: only the floor's pull is left
    if mode == "cross" and used_count:
        reg = (reg + (1 - used_sum / used_count)) / 2
    return c * reg
