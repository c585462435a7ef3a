"""The pruned export runs a LayerNorm on the kept units only, and its gated readers too.

Behind a gated layer whose task closes some units, a LayerNorm's statistics come from the kept
units (the closed ones are zero), its closed outputs are one number per position times the
norm's weight plus its bias, and a gated Linear or unpadded convolution reading it takes the
kept columns plus a rank-one term (pruned_norms.py). Checked: the formula against
``F.layer_norm`` on random shapes and kept sets, and pruned programs of models with LayerNorm
read by Linears, 1x1 and strided convolutions, by something else too, without an affine
transform, and by a padded convolution (which must get the whole output), against the network.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hatconvert
from hatconvert.pruned import _pruned_graph
from hatconvert.pruned_norms import closed_units_filled, compact_layer_norm
from helpers import train

timm = pytest.importorskip("timm")
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings, strategies as st  # noqa: E402
from timm.layers import LayerNorm2d  # noqa: E402


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(size=st.integers(2, 40), batch=st.integers(1, 3), tokens=st.integers(1, 5),
       channels_first=st.booleans(), seed=st.integers(0, 10_000), eps=st.sampled_from([1e-5, 1e-6]))
def test_the_compact_formula_is_layer_norm_of_the_zero_filled_tensor(size, batch, tokens,
                                                                    channels_first, seed, eps):
    g = torch.Generator().manual_seed(seed)
    kept = torch.randperm(size, generator=g)[:torch.randint(1, size + 1, (1,), generator=g)]
    kept = kept.sort().values
    dim = 1 if channels_first else 2
    shape = [batch, tokens, tokens] if channels_first else [batch, tokens]
    shape.insert(dim, len(kept))
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 3 + 1
    weight, bias = (torch.randn(size, generator=g, dtype=torch.float64) for _ in range(2))
    full = torch.zeros(*shape[:dim], size, *shape[dim + 1:], dtype=torch.float64)
    full.index_copy_(dim, kept, x)
    expected = F.layer_norm(full.movedim(dim, -1), (size,), weight, bias, eps).movedim(-1, dim)
    along = [1] * len(shape)
    along[dim] = -1
    y, scale = compact_layer_norm(x, weight[kept].reshape(along), bias[kept].reshape(along),
                                  size, eps, dim)
    torch.testing.assert_close(y, expected.index_select(dim, kept), rtol=1e-9, atol=1e-9)
    closed = torch.ones(size, dtype=torch.bool)
    closed[kept] = False
    filled = closed_units_filled(y, kept, size, dim, scale, (weight * closed).reshape(along),
                                 (bias * closed).reshape(along))
    torch.testing.assert_close(filled, expected, rtol=1e-9, atol=1e-9)


class TokenMLP(nn.Module):
    """Tokens ``(B, L, F)``: a gated Linear, LayerNorm, Linears that read it (64 units, so
    that a pruned Linear's rows padded to a multiple of 16 still leave some out)."""

    def __init__(self, affine=True, also_residual=False):
        super().__init__()
        self.fc0, self.ln = nn.Linear(12, 64), nn.LayerNorm(64, elementwise_affine=affine)
        self.fc1, self.fc2, self.head = nn.Linear(64, 24), nn.Linear(24, 64), nn.Linear(64, 3)
        self.also_residual = also_residual

    def forward(self, x):
        h = self.ln(self.fc0(x))
        out = self.fc2(F.gelu(self.fc1(h)))
        if self.also_residual:  # something that is not a gated layer reads the norm too
            out = out + h
        return self.head(out.mean(1))


class ConvNeXtish(nn.Module):
    """A depthwise conv into timm's LayerNorm2d read by a 1x1 conv (ConvNeXt's block), a
    LayerNorm2d read by a strided 2x2 conv (its downsampling), and one read by a padded conv."""

    def __init__(self, padded_reader=False):
        super().__init__()
        self.stem = nn.Conv2d(3, 24, 3, padding=1)
        self.dw, self.norm = nn.Conv2d(24, 24, 3, padding=1, groups=24), LayerNorm2d(24)
        self.fc1, self.fc2 = nn.Conv2d(24, 48, 1), nn.Conv2d(48, 24, 1)
        self.down_norm = LayerNorm2d(24)
        self.down = nn.Conv2d(24, 32, 3, padding=1) if padded_reader else \
            nn.Conv2d(24, 32, 2, stride=2)
        self.head = nn.Linear(32, 3)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = x + self.fc2(F.gelu(self.fc1(self.norm(self.dw(x)))))
        x = self.down(self.down_norm(self.fc2(F.gelu(self.fc1(self.norm(self.dw(x)))))))
        return self.head(x.mean((2, 3)))


CASES = {  # name: (model, input shape, LayerNorms run on kept units)
    "tokens": (TokenMLP, (5, 12), 1),
    "tokens-no-affine": (lambda: TokenMLP(affine=False), (5, 12), 1),
    "tokens-also-residual": (lambda: TokenMLP(also_residual=True), (5, 12), 0),
    "convnext-block-and-downsample": (ConvNeXtish, (3, 8, 8), 3),
    "padded-reader": (lambda: ConvNeXtish(padded_reader=True), (3, 8, 8), 2),
    "timm-convnext": (lambda: timm.create_model("convnext_atto", num_classes=3), (3, 32, 32),
                      None),
}


def with_random_closures(name, seed=0):
    build, shape, _ = CASES[name]
    torch.manual_seed(seed)
    net = hatconvert.convert(build(), num_tasks=2, num_classes=3)
    x = torch.randn(4, *shape)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    for t in range(2):
        train(net, opt, t, x, torch.randint(0, 3, (4,)), steps=2)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for gate in net.gates().values():  # about a third of every layer's units closed
            n = gate.embedding.shape[1]
            gate.embedding[1] = torch.where(torch.rand(n, generator=g) < 0.35, -4.0, 4.0)
    return net.eval(), x


@pytest.mark.parametrize("name", list(CASES))
def test_pruned_layer_norms_run_on_kept_units_and_stay_exact(name):
    net, x = with_random_closures(name)
    graph = _pruned_graph(net, 1, x, True)
    called = [n.target for n in graph.graph.nodes if n.op == "call_function"]
    expected_norms = CASES[name][2]
    compact = called.count(compact_layer_norm)
    if expected_norms is None:
        assert compact >= 10  # convnext_atto: its blocks' norms behind depthwise convs
    else:
        assert compact == expected_norms
    with torch.no_grad():
        torch.testing.assert_close(graph(x), net(x, 1), rtol=1e-5, atol=1e-5)
    program = hatconvert.export(net, 1, prune=True)  # its own check, then torch.export
    x2 = torch.randn(3, *x.shape[1:])
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x2), net(x2, 1), rtol=1e-5, atol=1e-5)


def test_the_norms_readers_take_only_the_kept_columns():
    net, x = with_random_closures("tokens")
    graph = _pruned_graph(net, 1, x, True)
    layers = {name.split("_m")[0]: m for name, m in graph.named_children()}
    fc0, fc1 = layers["fc0"], layers["fc1"]
    assert fc0.in_features == 12 and fc0.out_features < 64
    assert fc1.in_features == fc0.out_features  # the norm's kept units, not all 64
