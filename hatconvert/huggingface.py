"""HuggingFace ``transformers`` models: converted directly, rebuilt from their config.

transformers 5 has no torch.fx tracer of its own, and its forwards branch on their inputs, on
the config and on the attention implementation, so plain fx cannot trace them either. A
``PreTrainedModel`` is therefore never traced: it is kept whole (toplevel.py) and converted
inside. Its own forward runs with the gates in scope, so every input it takes
(``input_ids``, ``attention_mask``, ``token_type_ids``, ``pixel_values``, ``input_values``, ...)
stays an input and its output keeps its type (a ``ModelOutput`` with ``.logits``). Every Linear
and GPT-2 ``Conv1D`` is gated, norms are task-indexed, large embedding tables are frozen after
task 0 (embeddings.py), and what is left follows the loose policy. The price of running the
forward eagerly: every input of every layer counts as used, so whole rows of the units an
earlier task uses are protected.

The head of a task model (``...ForSequenceClassification`` and the like) is the last layer it
registers outside its backbone (``model.base_model``): ``classifier``, ``score``,
``classifier.out_proj``. A backbone (``AutoModel``) has none. A checkpoint stores the class name
and the config, so ``load`` rebuilds the model with no hub access.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from torch import nn

from .embeddings import tied_tables
from .errors import CheckpointError, ConversionError
from .layers import is_gatable, output_units

__all__ = ["KEPT_WHOLE_REASON", "FIXED_WIDTH_TASKS", "is_pretrained_model", "task_heads",
           "check_convertible", "source_of", "build_from_source"]

KEPT_WHOLE_REASON = "a transformers model, whose own forward runs: transformers 5 has no fx tracer"


def is_pretrained_model(model: Any) -> bool:
    """Whether ``model`` is a ``transformers.PreTrainedModel`` (without importing transformers)."""
    module = sys.modules.get("transformers")
    cls = getattr(module, "PreTrainedModel", None) if module is not None else None
    return isinstance(cls, type) and isinstance(model, cls)


def task_heads(model: nn.Module) -> list[str]:
    """The heads of a task model: the layers outside its backbone with ``config.num_labels``
    units (both of DeiT's distilled classifiers), else the last layer it registers there. A
    backbone (a class whose name has no ``For``: ``BertModel``) has none, and neither has a
    language model whose output layer is tied to its word embeddings (frozen with them)."""
    if "For" not in type(model).__name__:
        return []
    base = getattr(model, "base_model", model)
    base_path = next((p for p, m in model.named_modules() if m is base), "")
    layers = [p for p, m in model.named_modules() if p and is_gatable(m)
              and not (base_path and (p == base_path or p.startswith(f"{base_path}.")))]
    if layers and id(model.get_submodule(layers[-1]).weight) in tied_tables(model):
        return []
    labels = getattr(getattr(model, "config", None), "num_labels", None)
    classifiers = [p for p in layers if output_units(model.get_submodule(p)) == labels]
    return classifiers or layers[-1:]


# Task heads whose width the task fixes (start/end logits, one score per choice, the
# vocabulary): num_classes cannot resize them, the model's own code reads that width.
FIXED_WIDTH_TASKS = ("ForMultipleChoice", "ForQuestionAnswering", "ForNextSentencePrediction",
                     "ForPreTraining", "ForMaskedLM", "ForCausalLM", "LMHeadModel", "ForCTC")


def check_convertible(model: nn.Module, heads: list[str], num_classes: Any) -> None:
    """Refuse what cannot work: gradient checkpointing (its recomputation in backward runs the
    layers outside the network's forward, without their gates), and ``num_classes`` for a head
    whose width the task fixes."""
    renamed = hasattr(model, "is_activation_checkpointing")  # transformers 5 renamed it
    if getattr(model, "is_activation_checkpointing" if renamed else "is_gradient_checkpointing",
               False):
        off = "activation" if renamed else "gradient"
        off = f"{off}_checkpointing_disable"
        raise ConversionError(f"{type(model).__name__} has gradient (activation) checkpointing "
                              "enabled: its backward recomputes layers outside the network's "
                              f"forward, without their gates; call model.{off}() before "
                              "converting")
    fixed = next((k for k in FIXED_WIDTH_TASKS if k in type(model).__name__), None)
    if fixed is not None and num_classes is not None:
        raise ConversionError(
            f"{type(model).__name__} has a head whose width its task fixes "
            f"({', '.join(heads) or 'its output layer'}; the model's code reads that width): "
            "num_classes cannot resize it; convert without num_classes (each task still gets "
            "its own copy of the head)")


def source_of(model: nn.Module) -> dict[str, Any]:
    """What a checkpoint records to rebuild ``model``: its class name and config as JSON."""
    config = model.config
    return {"kind": "transformers", "class": type(model).__name__,
            "config": json.loads(config.to_json_string(use_diff=False)),
            "attn_implementation": getattr(config, "_attn_implementation", None)}


def build_from_source(path: str, source: dict[str, Any]) -> nn.Module:
    """A fresh model of the class and config ``source`` names (its weights come from the file)."""
    name = source.get("class")
    try:
        import transformers
    except ImportError:
        raise CheckpointError(f"{path!r} holds a transformers model ({name}): pip install "
                              "transformers (or hatconvert[transformers]) to load it, or pass "
                              "model=") from None
    cls = getattr(transformers, str(name), None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise CheckpointError(f"{path!r} holds a transformers model of class {name!r}, which "
                              f"transformers {transformers.__version__} does not have: pass "
                              "the architecture with model=")
    try:
        config = cls.config_class.from_dict(dict(source.get("config") or {}))
        if source.get("attn_implementation"):
            config._attn_implementation = source["attn_implementation"]
        return cls(config).eval()
    except Exception as exc:  # a config of another transformers version may not fit
        raise CheckpointError(f"cannot rebuild {name} of {path!r} from its stored config: "
                              f"{type(exc).__name__}: {exc}") from exc
