"""The conversion options: one typed record, checked once, stored in checkpoints, read by the CLI.

``convert(model, num_tasks, **options)`` builds a ``ConversionOptions``; the network keeps it
(``net.options``) with the head it found; ``save`` writes ``to_config()`` and ``load`` rebuilds
the network from ``from_config()``; the command line takes its choices, defaults and help from
the fields here, so no option is spelled out twice.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Sequence

from .embeddings import EMBEDDING_POLICIES
from .errors import OptionError

__all__ = ["ConversionOptions", "CONVERSION_MASK_INITS", "DEFAULT_MASK_INIT", "MASK_INITS",
           "LOOSE_POLICIES", "LEAF_POLICIES", "check_choice", "check_regularization", "check_s_max"]

MASK_INITS = ("small_normal", "normal", "uniform", "U01", "U-10", "dense", "last")  # begin_task's
CONVERSION_MASK_INITS = ("small_normal", "normal", "uniform", "dense")  # need no earlier task
DEFAULT_MASK_INIT = "small_normal"  # N(0, 0.05^2): see gates.SMALL_NORMAL_STD; "normal" is the paper's
LOOSE_POLICIES = ("task", "freeze")
LEAF_POLICIES = ("convert", "loose")


def check_choice(option: str, value: Any, choices: Sequence[str], hint: str = "") -> str:
    """``value`` if it is one of ``choices``, else an ``OptionError`` naming the option."""
    if not isinstance(value, str) or value not in choices:
        raise OptionError(f"unknown {option} {value!r}; choose one of {', '.join(choices)}{hint}")
    return value


def check_s_max(s_max: Any) -> float:
    """The largest mask scale, a positive finite number (the schedules and ``begin_task``)."""
    if isinstance(s_max, bool) or not isinstance(s_max, (int, float)) \
            or not math.isfinite(s_max) or s_max <= 0:
        raise OptionError(f"s_max must be a positive number, got {s_max!r}")
    return float(s_max)


def check_regularization(c: Any, mode: Any) -> None:
    """HAT's sparsity penalty: a strength ``c`` (finite, >= 0) and a mode (original, cross or
    total)."""
    if isinstance(c, bool) or not isinstance(c, (int, float)) or not math.isfinite(c) or c < 0:
        raise OptionError(f"the regularization strength c must be a finite number >= 0, "
                          f"got {c!r}")
    check_choice("regularization mode", mode, ("original", "cross", "total"))


def _doc(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass(frozen=True)
class ConversionOptions:
    """How to convert a model; every value is checked when the record is made."""

    num_tasks: int = field(metadata=_doc("number of tasks"))
    num_classes: int | Sequence[int] | None = field(default=None, metadata=_doc(
        "classes per task: one number for all tasks, or one per task"))
    mask_init: str = field(default=DEFAULT_MASK_INIT, metadata=_doc(
        "task embedding initialisation (small_normal N(0,0.05^2), the default: training decides "
        "every unit, far more capacity left under Adam-type optimizers; normal N(0,1), the "
        "paper's; uniform U(-1,1); dense: all units open)"))
    head: str | Sequence[str] | bool | None = field(default=None, metadata=_doc(
        "module path of the classifier (or several); None finds it, False: no head"))
    loose: str = field(default="task", metadata=_doc(
        "parameters read directly and leaves with hidden weights: one copy per task (task) or "
        "frozen after task 0 (freeze)"))
    include: str | Sequence[str] | None = field(default=None, metadata=_doc(
        "module-path patterns (fnmatch) of the layers to gate"))
    exclude: str | Sequence[str] | None = field(default=None, metadata=_doc(
        "module-path patterns (fnmatch) of layers not to gate"))
    leaves: str = field(default="convert", metadata=_doc(
        "leaf modules fx does not trace: gate the layers inside (convert) or treat them by "
        "--loose (loose)"))
    auto_leaves: bool = field(default=False, metadata=_doc(
        "keep a submodule whole when tracing breaks inside it, instead of failing"))
    embeddings: str = field(default="auto", metadata=_doc(
        "embedding tables: auto freezes those holding a hundredth of the parameters or more "
        "after task 0 and gives smaller ones the loose policy; loose: all by --loose; "
        "freeze: all frozen after task 0"))

    CHOICES = {"mask_init": CONVERSION_MASK_INITS, "loose": LOOSE_POLICIES,
               "leaves": LEAF_POLICIES, "embeddings": EMBEDDING_POLICIES}

    def __post_init__(self) -> None:
        n = self.num_tasks
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise OptionError(f"num_tasks must be an int >= 1, got {n!r}")
        others = ", ".join(m for m in MASK_INITS if m not in CONVERSION_MASK_INITS)
        check_choice("mask_init", self.mask_init, CONVERSION_MASK_INITS,
                     f" (begin_task also takes {others})")
        check_choice("loose policy", self.loose, LOOSE_POLICIES)
        check_choice("leaves policy", self.leaves, LEAF_POLICIES)
        check_choice("embeddings policy", self.embeddings, EMBEDDING_POLICIES)
        if not isinstance(self.auto_leaves, bool):
            raise OptionError(f"auto_leaves must be True or False, got {self.auto_leaves!r}")
        object.__setattr__(self, "num_classes", per_task_classes(self.num_classes, n))
        object.__setattr__(self, "include", patterns(self.include, "include"))
        object.__setattr__(self, "exclude", patterns(self.exclude, "exclude"))
        object.__setattr__(self, "head", head_paths(self.head))
        if self.head is False and self.num_classes is not None:
            raise OptionError("num_classes needs a head; do not pass head=False with it")

    @classmethod
    def default(cls, name: str) -> Any:
        """A field's default value (the command line shows it)."""
        return next(f.default for f in fields(cls) if f.name == name)

    @classmethod
    def help(cls, name: str) -> str:
        """A field's help text (the command line shows it)."""
        return next(f.metadata["help"] for f in fields(cls) if f.name == name)

    def to_config(self) -> dict[str, Any]:
        """Plain JSON values, as a checkpoint stores them."""
        config = asdict(self)
        config["include"] = list(self.include or [])
        config["exclude"] = list(self.exclude or [])
        return config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "ConversionOptions":
        """The options a checkpoint stored; a head the conversion did not find becomes False.
        Files written before the ``embeddings`` option copied tables by the loose policy."""
        names = {f.name for f in fields(cls)}
        values = {"embeddings": "loose", **{k: v for k, v in config.items() if k in names}}
        values["head"] = config.get("head") or False
        return cls(**values)


def per_task_classes(num_classes: Any, num_tasks: int) -> list[int] | None:
    """One class count per task, or None to keep the model's head as it is."""
    if num_classes is None:
        return None
    if isinstance(num_classes, int) and not isinstance(num_classes, bool):
        counts = [num_classes] * num_tasks
    elif isinstance(num_classes, (list, tuple)):
        counts = list(num_classes)
        if len(counts) != num_tasks:
            raise OptionError(f"num_classes has {len(counts)} entries but num_tasks is "
                              f"{num_tasks}: give one class count per task")
    else:
        raise OptionError(f"num_classes must be an int or a list of ints, got {num_classes!r}")
    bad = [c for c in counts if isinstance(c, bool) or not isinstance(c, int) or c < 1]
    if bad:
        raise OptionError(f"num_classes entries must be ints >= 1, got {bad}")
    return counts


def patterns(value: Any, option: str) -> list[str] | None:
    """``include``/``exclude`` as a list of fnmatch patterns; one string is one pattern."""
    if value is None:
        return None
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple, set, frozenset)) or \
            not all(isinstance(p, str) for p in items):
        raise OptionError(f"{option} must be a module-path pattern or a list of them, "
                          f"got {value!r}")
    return list(items) or None


def head_paths(head: Any) -> str | list[str] | bool | None:
    """``head`` as one path, a list of paths, None (find it) or False (no head)."""
    if head is None or head is False or isinstance(head, str):
        return head
    if head is True:
        return None
    if isinstance(head, (list, tuple)) and head and all(isinstance(h, str) for h in head):
        return list(head)
    raise OptionError(f"head must be a module path, a list of them, None or False, got {head!r}")
