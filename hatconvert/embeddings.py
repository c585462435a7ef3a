"""Which embedding tables are frozen once task 0 ends instead of copied per task.

An embedding table has no output units to gate (its rows are tokens, not units), so the loose
policy decides it like any module with hidden weights: with ``loose="task"`` one copy per task.
For a word embedding that is the wrong trade: BERT-base's 23.4M-parameter table copied for 10
tasks would triple the model. ``embeddings="auto"`` (the default) freezes every table that holds
at least ``LARGE_FRACTION`` of the model's parameters (and every table the model already
freezes) once task 0 ends, and leaves smaller tables (position and token-type tables of a large
model) to the loose policy; ``"loose"`` gives every table the loose policy; ``"freeze"`` freezes
every table. A table tied to a layer (a language model's output layer sharing its word
embeddings) is frozen under every mode, and the layer with it: one tensor can be neither gated
and frozen at once nor copied per task and still shared. The report lists each frozen table
with its size.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

__all__ = ["EMBEDDING_POLICIES", "LARGE_FRACTION", "EmbeddingPolicy", "tied_tables"]

EMBEDDING_POLICIES = ("auto", "loose", "freeze")
LARGE_FRACTION = 0.01  # a table this share of the model's parameters is "large enough to matter"
EMBEDDING_TYPES = (nn.Embedding, nn.EmbeddingBag)


def tied_tables(model: nn.Module) -> set[int]:
    """Ids of the embedding weights that another module of ``model`` holds as its weight."""
    tables = {id(m.weight) for m in model.modules() if isinstance(m, EMBEDDING_TYPES)}
    return {id(w) for m in model.modules() if not isinstance(m, EMBEDDING_TYPES)
            for w in [m._parameters.get("weight")] if id(w) in tables}


@dataclass
class EmbeddingPolicy:
    """The ``embeddings`` option applied to one model of ``model_params`` parameters."""

    mode: str = "loose"
    model_params: int = 0
    frozen: dict[str, int] = field(default_factory=dict)  # path -> size of each table frozen
    tied: set[int] = field(default_factory=set)  # ids of tables another module holds too

    @classmethod
    def for_model(cls, mode: str, model: nn.Module) -> "EmbeddingPolicy":
        """The policy for ``model``: sizes are judged against its parameter count."""
        return cls(mode, sum(p.numel() for p in model.parameters()
                             if not isinstance(p, nn.parameter.UninitializedParameter)),
                   tied=tied_tables(model))

    def freezes(self, module: nn.Module) -> bool:
        """Whether ``module`` is an embedding table this policy freezes after task 0, or a
        layer whose weight is one."""
        return self._freezes_table(module) or id(module._parameters.get("weight")) in self.tied

    def _freezes_table(self, module: nn.Module) -> bool:
        if not isinstance(module, EMBEDDING_TYPES):
            return False
        weight = module.weight
        if id(weight) in self.tied:
            return True
        return self.mode != "loose" and (
            self.mode == "freeze" or not weight.requires_grad
            or weight.numel() >= LARGE_FRACTION * max(self.model_params, 1))

    def freezes_inside(self, module: nn.Module) -> bool:
        """Whether ``module`` holds a table this policy freezes (so it must be walked into)."""
        return any(self.freezes(m) for m in module.modules())

    def record(self, path: str, module: nn.Module) -> None:
        """Remember a frozen table (or a layer tied to one) for the report."""
        tied = "" if isinstance(module, EMBEDDING_TYPES) else " (tied to an embedding table)"
        self.frozen[path + tied] = module.weight.numel()
