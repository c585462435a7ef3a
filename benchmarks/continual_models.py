"""The networks of ``continual.py``: the HAT paper's MLP and AlexNet-style CNN, and timm models
set up for 28x28 one-channel images, all from random initialisation."""

from __future__ import annotations

import copy
import re
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

ARCHS = ("mlp", "alexnet", "resnet18", "convnext_atto", "vit")


class MLP(nn.Module):
    """Two hidden ReLU layers, as in the HAT paper's permuted-MNIST runs; its code drops 20% of
    the pixels and 50% of each hidden layer's units (``dropout=(0.2, 0.5)``)."""

    def __init__(self, classes: int, hidden: int = 1000, dropout: tuple[float, float] = (0, 0)):
        super().__init__()
        self.drop_in, self.drop_hidden = nn.Dropout(dropout[0]), nn.Dropout(dropout[1])
        self.fc1 = nn.Linear(28 * 28, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x):
        x = self.drop_hidden(F.relu(self.fc1(self.drop_in(torch.flatten(x, 1)))))
        return self.head(self.drop_hidden(F.relu(self.fc2(x))))


class AlexNetLike(nn.Module):
    """The HAT paper's small CNN: three conv layers (64, 128, 256; kernels 4, 3, 2) with max
    pooling, two fully connected layers of 2048, dropout."""

    def __init__(self, classes: int, fc: int = 2048):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 64, 4)     # 28 -> 25 -> pool 12
        self.conv2 = nn.Conv2d(64, 128, 3)   # 12 -> 10 -> pool 5
        self.conv3 = nn.Conv2d(128, 256, 2)  # 5 -> 4 -> pool 2
        self.fc1 = nn.Linear(256 * 2 * 2, fc)
        self.fc2 = nn.Linear(fc, fc)
        self.head = nn.Linear(fc, classes)
        self.drop1 = nn.Dropout(0.2)
        self.drop2 = nn.Dropout(0.5)

    def forward(self, x):
        x = self.drop1(F.max_pool2d(F.relu(self.conv1(x)), 2))
        x = self.drop1(F.max_pool2d(F.relu(self.conv2(x)), 2))
        x = self.drop2(F.max_pool2d(F.relu(self.conv3(x)), 2))
        x = self.drop2(F.relu(self.fc1(torch.flatten(x, 1))))
        return self.head(self.drop2(F.relu(self.fc2(x))))


def builder(arch: str, vit_depth: int = 4, mlp_hidden: int = 1000,
            mlp_dropout: tuple[float, float] = (0, 0)) -> Callable[[int], nn.Module]:
    """A function ``classes -> fresh randomly initialised model`` for ``arch``."""
    if arch == "mlp":
        return lambda classes: MLP(classes, mlp_hidden, mlp_dropout)
    if arch == "alexnet":
        return AlexNetLike
    import timm
    if arch == "convnext_atto":  # 32 px, stem stride 2: 16 -> 8 -> 4 -> 2 through the stages
        return lambda classes: PadTo32(timm.create_model(
            "convnext_atto", num_classes=classes, in_chans=1, patch_size=2))
    kwargs = {"resnet18": {"in_chans": 1},
              "vit": {"in_chans": 1, "img_size": 28, "patch_size": 4, "depth": vit_depth}}[arch]
    name = "vit_tiny_patch16_224" if arch == "vit" else arch
    return lambda classes: timm.create_model(name, num_classes=classes, **kwargs)


class PadTo32(nn.Module):
    """Zero-pads 28x28 images to 32x32 for a network that halves them four times."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.pretrained_cfg = {"classifier": "net." + net.pretrained_cfg["classifier"]}

    def forward(self, x):
        return self.net(F.pad(x, (2, 2, 2, 2)))


def head_path(model: nn.Module) -> str:
    """The classifier's module path: ``head`` here, timm's ``pretrained_cfg`` otherwise."""
    cfg = getattr(model, "pretrained_cfg", None)
    return cfg["classifier"] if cfg else "head"


class _TaskHeads(nn.Module):
    """Stands in for the classifier: runs the head of the task ``MultiHead`` selected."""

    def __init__(self, heads: list[nn.Module]):
        super().__init__()
        self.heads = nn.ModuleList(heads)
        self.task = 0

    def forward(self, x):
        return self.heads[self.task](x)


class MultiHead(nn.Module):
    """Fine-tuning baseline: the network's body shared by all tasks, one head per task."""

    def __init__(self, model: nn.Module, num_tasks: int):
        super().__init__()
        path = head_path(model)
        head = model.get_submodule(path)
        heads = [copy.deepcopy(head) for _ in range(num_tasks)]
        for h in heads[1:]:
            for m in h.modules():
                if hasattr(m, "reset_parameters"):
                    m.reset_parameters()
        self.dispatch = _TaskHeads(heads)
        model.set_submodule(path, self.dispatch)
        self.model = model

    def for_task(self, t: int) -> "MultiHead":
        self.dispatch.task = t
        return self

    def forward(self, x):
        return self.model(x)


def layer_kind(path: str) -> str:
    """The layer's path with block numbers starred: ``layer*.*.conv1``, ``blocks.*.attn.qkv``."""
    return re.sub(r"\d+", "*", path)
