"""The layout record: what the conversion did, by module or parameter path, and what it means.

The graph passes (``rewrite.py``, ``convert.py``) fill one ``Layout``; the runtime (network,
protection, propagation, report, export, checkpoints) reads it through the methods here, so the
meaning of each field (which paths are task-indexed, which tensors are frozen, where task ``t``'s
copy lives) is written once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from .inputs import Signature

__all__ = ["GATES", "PARAMS", "GatePlacement", "GatedLayer", "Layout"]

GATES = "hat_gates"    # the graph module's container of every HATGate
PARAMS = "hat_params"  # its container of task-indexed loose parameters


class GatePlacement(str, Enum):
    """How a gate reaches its layer's output. Every placement computes ``gate * layer(x)``
    (behind the norm where one follows); folds touch a weight-sized tensor, not the activation.
    The values are the strings checkpoints store."""

    OUTPUT = "output"      # multiply the output (any layer, any norm subclass)
    WEIGHT = "weight"      # scale rows of weight and bias (exact nn.Linear / nn.ConvNd)
    NORM = "norm"          # scale the affine of the exact BatchNorm that follows
    FUNCTION = "function"  # on the output of each F.linear(x, layer.weight, ...)
    LEAF = "leaf"          # on the output of a layer inside a converted leaf (leaves.py)
    ROWS = "rows"          # folded into weight rows wherever the graph reads the weight

    def describe(self, norm: str | None, unit_dim: int, leaf: str | None) -> str:
        """The report's words for this placement."""
        side = "" if unit_dim == 1 else (" (before the norm instead when its channel dim is "
                                         "not the layer's last dim)")
        if self is GatePlacement.NORM:
            return f"folded into the affine of norm {norm}{side}"
        if self is GatePlacement.OUTPUT:
            return f"on the output of norm {norm}{side}" if norm else "on its output"
        return {GatePlacement.WEIGHT: "folded into its weight rows",
                GatePlacement.FUNCTION: "on the output of each F.linear that reads its weight",
                GatePlacement.LEAF: f"on its output, inside converted leaf {leaf}",
                GatePlacement.ROWS: "folded into its weight rows wherever the graph reads them",
                }[self]

    def __str__(self) -> str:
        return self.value


@dataclass
class GatedLayer:
    """One gated layer: where it is, its gate, and the norm (if any) the gate sits behind."""

    path: str
    gate: str
    units: int
    unit_dim: int
    norm: str | None = None
    mode: GatePlacement = GatePlacement.OUTPUT
    leaf: str | None = None  # the converted leaf the layer sits in (GatePlacement.LEAF)
    # FUNCTION: F.linear adds a bias that is not the layer's own (beit's q_bias, v_bias);
    # the gate multiplies it too, so scaling the weight rows and the layer's bias misses it
    external_bias: bool = False

    @property
    def behind_norm(self) -> bool:
        """Whether the gate is applied by the task-indexed norm that follows the layer."""
        return self.norm is not None and self.mode in (GatePlacement.NORM, GatePlacement.OUTPUT)


@dataclass
class Layout:
    """What the conversion did, by module or parameter path in the converted graph module."""

    gated: dict[str, GatedLayer] = field(default_factory=dict)
    norms: list[str] = field(default_factory=list)
    heads: list[str] = field(default_factory=list)
    task_leaves: list[str] = field(default_factory=list)
    frozen_leaves: list[str] = field(default_factory=list)
    task_params: dict[str, str] = field(default_factory=dict)  # original name -> new module path
    frozen_params: list[str] = field(default_factory=list)
    constant_buffers: list[str] = field(default_factory=list)
    frozen_in_gated: list[str] = field(default_factory=list)  # extra params of gated layers
    original_keys: list[str] = field(default_factory=list)  # the model's state_dict (export)
    converted_leaves: list[str] = field(default_factory=list)  # leaves converted inside
    frozen_tensors: list[str] = field(default_factory=list)  # params and buffers, by full name
    dropped: list[str] = field(default_factory=list)  # model tensors the network does not hold
    auto_leaves: list[str] = field(default_factory=list)  # submodules kept whole to trace
    mode_dependent: bool = False  # train and eval graphs differ: the eval graph is kept
    signature: Signature = field(default_factory=Signature)  # the inputs (inputs.py)
    head_note: str | None = None  # why the conversion chose no head
    recurrent: list[str] = field(default_factory=list)  # LSTM/GRU/RNN leaves (not gated)
    top_level: str | None = None  # kept whole (toplevel.py): why its forward does not trace
    frozen_embeddings: dict[str, int] = field(default_factory=dict)  # path -> table size

    def record_source(self, original_keys: list[str], mode_dependent: bool,
                      auto_leaves: list[str], dropped: list[str]) -> None:
        """What the source model and its trace tell, which the graph passes cannot see: its
        state-dict keys (for export), whether train and eval graphs differ, the submodules kept
        whole to trace, and its tensors the network does not hold."""
        self.original_keys = list(original_keys)
        self.mode_dependent = bool(mode_dependent)
        self.auto_leaves = list(auto_leaves)
        self.dropped = list(dropped)

    def structure(self) -> tuple:
        """What a graph of the same model must share to run over these converted modules: the
        gated layers and their gates, and every task-indexed, frozen and constant path."""
        gated = sorted((p, g.gate, GatePlacement(g.mode).value, g.norm, g.leaf)
                       for p, g in self.gated.items())
        return (gated, sorted(self.norms), sorted(self.heads), sorted(self.task_leaves),
                sorted(self.frozen_leaves), sorted(self.task_params.items()),
                sorted(self.frozen_parameters()), sorted(self.constant_buffers),
                sorted(self.frozen_tensors), sorted(self.converted_leaves))

    def task_indexed_modules(self) -> list[str]:
        """Paths of the ``TaskIndexed`` modules: norms, heads and leaves with one copy per task."""
        return self.norms + self.heads + self.task_leaves

    def task_indexed_parameters(self) -> dict[str, str]:
        """Original parameter name -> path of its ``TaskParameter`` (one copy per task)."""
        return dict(self.task_params)

    def frozen_parameters(self) -> list[str]:
        """Parameters read directly or held beside gated layers: frozen once task 0 ends."""
        return self.frozen_params + self.frozen_in_gated

    def modes(self) -> dict[str, str]:
        """Gate placement per gated layer, as the strings a checkpoint stores."""
        return {path: GatePlacement(g.mode).value for path, g in self.gated.items()}

    @staticmethod
    def copies_prefix(path: str) -> str:
        """Where the per-task copies of the module (or parameter) at ``path`` live."""
        return f"{path}.copies."

    @staticmethod
    def copy_key(path: str, task: int, rest: str = "") -> str:
        """State-dict key of task ``task``'s copy of ``path`` (``rest``: a tensor inside it)."""
        return f"{path}.copies.{task}" + (f".{rest}" if rest else "")

    @staticmethod
    def split_copy_key(key: str, prefix: str) -> tuple[int, str]:
        """``(task, rest)`` of a key under ``copies_prefix``: the inverse of ``copy_key``."""
        index, _, rest = key[len(prefix):].partition(".")
        return int(index), rest
