"""Small hand-written models whose structure the tests rely on."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ResidualConcatNet(nn.Module):
    """Residual add, concatenation, functional calls and a flatten into a Linear."""

    def __init__(self, classes: int = 5):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.branch_a = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.branch_b = nn.Conv2d(8, 4, 1)
        self.gn = nn.GroupNorm(2, 4)
        self.mix = nn.Conv2d(12, 6, 3, stride=2, padding=1)
        self.fc = nn.Linear(6 * 4 * 4, 16)
        self.ln = nn.LayerNorm(16)
        self.out = nn.Linear(16, classes)

    def forward(self, x):
        x = F.relu(self.bn(self.stem(x)))
        x = x + torch.tanh(self.branch_a(x))           # residual add
        y = F.silu(self.gn(self.branch_b(x)))
        x = torch.cat([x, y], dim=1)                    # concatenation
        x = F.max_pool2d(F.relu(self.mix(x)), 2)
        x = torch.flatten(x, 1)                         # flatten into a Linear
        x = F.gelu(self.ln(self.fc(x)))
        return self.out(x)


class SequenceNet(nn.Module):
    """Conv1d, ConvTranspose1d, BatchNorm1d after a Linear, InstanceNorm, a loose parameter."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(2, 6, 3, padding=1)
        self.inorm = nn.InstanceNorm1d(6, affine=True)
        self.up = nn.ConvTranspose1d(6, 4, 2, stride=2)
        self.scale = nn.Parameter(torch.full((4, 1), 0.5))
        self.fc = nn.Linear(4 * 16, 10)
        self.bn = nn.BatchNorm1d(10)
        self.head = nn.Linear(10, 3)

    def forward(self, x):
        x = F.relu(self.inorm(self.conv(x)))
        x = self.up(x) * self.scale
        x = F.relu(self.bn(self.fc(x.reshape(x.shape[0], -1))))
        return self.head(x)


class DataDependent(nn.Module):
    """Python control flow on a tensor value inside a submodule: cannot be traced."""

    class Router(nn.Module):
        def forward(self, x):
            if x.sum() > 0:
                return x
            return -x

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.router = self.Router()

    def forward(self, x):
        return self.router(self.fc(x))
