"""hatconvert: turn any PyTorch model into a HAT (Hard Attention to the Task) continual learner."""

from .checkpoint import load, save
from .convert import convert
from .errors import (CheckpointError, ConversionError, DistributedError, ExportError, HATError,
                     InputError, MixedBatchError, TaskError)
from .export import export
from .network import HATNetwork
from .registry import register_layer
from .schedules import mask_scale
from .training import train_task
from .tracing import register_leaf_function, register_leaf_module

__version__ = "0.1.0"

__all__ = ["convert", "HATNetwork", "ConversionError", "TaskError", "HATError",
           "register_leaf_module", "register_leaf_function", "mask_scale", "train_task",
           "__version__", "save", "load", "export", "CheckpointError", "ExportError",
           "register_layer", "InputError", "MixedBatchError", "DistributedError"]
