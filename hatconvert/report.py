"""The conversion report: what became what, and proof that no parameter was left outside."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from .layout import GATES, GatePlacement, Layout

__all__ = ['CATEGORIES', 'ConversionReport', 'classify_tensors']

CATEGORIES = ("gated", "gate", "task-indexed", "frozen", "constant")
SHOWN = 8  # names listed per report line before "and N more"


@dataclass
class ConversionReport:
    """Every parameter and buffer of a converted network, by category, plus the layer lists."""

    layout: Layout
    num_tasks: int
    original_params: int
    converted_params: int
    tensors: dict[str, str] = field(default_factory=dict)  # name in the graph module -> category
    frozen_names: list[str] = field(default_factory=list)  # requires_grad=False in the model

    @property
    def overhead_percent(self) -> float:
        """Parameters added by the conversion, in percent of the original's."""
        return 100.0 * (self.converted_params - self.original_params) / max(self.original_params, 1)

    def count(self, category: str) -> int:
        """Number of tensors in ``category``."""
        return sum(1 for c in self.tensors.values() if c == category)

    def frozen_by_model(self) -> list[str]:
        """Parameters the model itself froze (``requires_grad=False``), by name in the graph."""
        return list(self.frozen_names)

    def __str__(self) -> str:
        lay = self.layout
        lines = [f"HAT conversion: {self.num_tasks} tasks",
                 f"  gated layers ({len(lay.gated)}):"]
        for g in lay.gated.values():
            where = GatePlacement(g.mode).describe(g.norm, g.unit_dim, g.leaf)
            lines.append(f"    {g.path} ({g.units} units): gate {where}")
        sections = [
            ("task-indexed norms", lay.norms),
            ("task-indexed heads", lay.heads),
            ("task-indexed leaves (weights hidden inside)", lay.task_leaves),
            ("frozen leaves (weights hidden inside, frozen after task 0)", lay.frozen_leaves),
            ("task-indexed parameters", list(lay.task_params)),
            ("frozen parameters (frozen after task 0)", lay.frozen_parameters()),
            ("converted leaves (layers inside gated, norms task-indexed)", lay.converted_leaves),
            ("frozen tensors inside converted leaves or written by the graph (frozen after "
             "task 0)", lay.frozen_tensors),
            ("constant buffers read by the graph", lay.constant_buffers),
            ("submodules kept whole because tracing broke inside them", lay.auto_leaves),
            ("tensors of the model the network does not hold (unused by the eval-mode "
             "forward, or read once while tracing and baked into the graph as fixed values)",
             lay.dropped),
        ]
        for title, items in sections:
            if items:
                lines.append(f"  {title} ({len(items)}): " + ", ".join(items))
        if lay.top_level:
            lines.append(f"  the model is kept whole: {lay.top_level}; the layers inside are "
                         "gated on their outputs, "
                         "and every input of every layer counts as used by every task (whole "
                         "rows of the units an earlier task uses are protected)")
        if lay.recurrent:
            how = "one copy per task" if set(lay.recurrent) <= set(lay.task_leaves) else \
                "by the loose policy"
            lines.append(f"  recurrent layers ({len(lay.recurrent)}): {', '.join(lay.recurrent)}"
                         f" are not gated (a closed unit would still feed the recurrence); "
                         f"they are kept {how}")
        if lay.head_note:
            lines.append(f"  {lay.head_note}")
        if lay.frozen_embeddings:
            lines.append(self._embeddings_line())
        frozen = self.frozen_by_model()
        if frozen:
            more = f", and {len(frozen) - SHOWN} more" if len(frozen) > SHOWN else ""
            lines.append(f"  frozen by the model (requires_grad=False: no gradient hooks, no "
                         f"step moves them; a gated one keeps its gate) ({len(frozen)}): "
                         + ", ".join(frozen[:SHOWN]) + more)
        lines += lay.signature.describe()
        if lay.mode_dependent:
            lines.append("  the forward branches on self.training: the eval-mode graph is used "
                         "in both modes (train-only branches are left out)")
        counts = ", ".join(f"{c} {self.count(c)}" for c in CATEGORIES)
        lines.append(f"  tensors: {counts}; unaccounted 0")
        lines.append(f"  parameters: {self.original_params:,} -> {self.converted_params:,} "
                     f"(+{self.overhead_percent:.2f}%)")
        return "\n".join(lines)

    def _embeddings_line(self) -> str:
        total = max(self.original_params, 1)
        tables = [f"{p} ({n:,} parameters, {100 * n / total:.1f}%)"
                  for p, n in self.layout.frozen_embeddings.items()]
        return (f"  embedding tables frozen once task 0 ends, not copied per task "
                f"({len(tables)}): {', '.join(tables)}; convert with embeddings='loose' to "
                "give the untied ones the loose policy (one copy per task) instead")


def classify_tensors(gm: nn.Module, layout: Layout) -> dict[str, str]:
    """Put every parameter and buffer of ``gm`` in one category; raise on one left outside.

    This is the "nothing outside the system" check: it runs at every conversion.
    """
    prefixes: list[tuple[str, str]] = []
    for path in layout.gated:
        prefixes += [(f"{path}.weight", "gated"), (f"{path}.bias", "gated")]
    prefixes += [(f"{GATES}.", "gate")]  # task embeddings and stored masks
    for path in layout.task_indexed_modules() + list(layout.task_indexed_parameters().values()):
        prefixes.append((Layout.copies_prefix(path), "task-indexed"))
    for path in layout.frozen_leaves:
        prefixes.append((f"{path}.", "frozen"))
    for name in layout.frozen_parameters() + layout.frozen_tensors:
        prefixes.append((name, "frozen"))
    for name in layout.constant_buffers:
        prefixes.append((name, "constant"))

    exact: dict[str, str] = {}
    ancestors: dict[str, str] = {}  # "a.b." -> category of every tensor under a.b
    for prefix, cat in prefixes:
        (ancestors if prefix.endswith(".") else exact).setdefault(prefix, cat)

    def category(name: str) -> str | None:
        if name in exact:
            return exact[name]
        parts = name.split(".")
        for k in range(1, len(parts)):  # outermost first, as a prefix scan would find it
            cat = ancestors.get(".".join(parts[:k]) + ".")
            if cat is not None:
                return cat
        return None

    tensors: dict[str, str] = {}
    unaccounted = []
    named = list(gm.named_parameters(remove_duplicate=False)) + list(
        gm.named_buffers(remove_duplicate=False))
    for name, tensor in named:
        cat = category(name)
        if cat is None:
            unaccounted.append(name)
        elif isinstance(tensor, nn.Parameter) and not tensor.requires_grad:
            tensors[name] = "frozen"  # by the model: whatever its place, nothing trains it
        else:
            tensors[name] = cat
    if unaccounted:
        from .errors import ConversionError
        raise ConversionError("conversion left tensors outside the HAT system (neither gated, "
                              "task-indexed nor frozen): " + ", ".join(unaccounted))
    return tensors
