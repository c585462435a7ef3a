"""The compact protection: held entries and gradient rates from two factors per layer.

For every kind of gated layer and random masks, what the guard holds and scales must be exactly
the dense rule ``min(M_out[o], M_in[i])`` laid out like the weight, and its memory must follow
the protected entries, not the weight.
"""

from __future__ import annotations

import timm
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

import hatconvert
from hatconvert.held import hold
from hatconvert.protected import adjustment_rate, protection_of, rate_hook, weight_protection
from helpers import eval_out, train


def _layers(draw_channels):
    """Gated layer kinds: (name, factory of (in, out), in features, out units)."""
    i, o = draw_channels
    g = 2 if i % 2 == 0 and o % 2 == 0 else 1
    return {
        "linear": (nn.Linear(i, o), i, o),
        "conv": (nn.Conv2d(i, o, 3), i, o),
        "conv1x1": (nn.Conv2d(i, o, 1, bias=False), i, o),
        "grouped": (nn.Conv2d(i, o, 3, groups=g), i, o),
        "depthwise": (nn.Conv2d(i, 2 * i, 3, groups=i), i, 2 * i),
        "transposed": (nn.ConvTranspose2d(i, o, 2), i, o),
        "transposed-grouped": (nn.ConvTranspose2d(i, o, 2, groups=g), i, o),
        "conv1d": (nn.Conv1d(i, o, 5), i, o),
    }


@settings(max_examples=60, deadline=None)
@given(kind=st.sampled_from(["linear", "conv", "conv1x1", "grouped", "depthwise", "transposed",
                             "transposed-grouped", "conv1d"]),
       channels=st.tuples(st.integers(1, 6).map(lambda n: 2 * n), st.integers(1, 6)
                          .map(lambda n: 2 * n)),
       seed=st.integers(0, 2**16), binary=st.booleans(),
       mode=st.sampled_from(["hat", "hat_const_alpha"]))
def test_compact_protection_holds_and_scales_exactly_the_dense_rule(kind, channels, seed, binary,
                                                                     mode):
    torch.manual_seed(seed)
    layer, n_in, n_out = _layers(channels)[kind]
    out_mask, in_mask = torch.rand(n_out), torch.rand(n_in)
    if binary:
        out_mask, in_mask = (out_mask < 0.5).float(), (in_mask < 0.6).float()
    dense_w, dense_b = weight_protection(layer, out_mask, in_mask)
    weight, bias = protection_of(layer, out_mask, in_mask)
    for param, protection, dense in ((layer.weight, weight, dense_w), (layer.bias, bias, dense_b)):
        if param is None:
            continue
        held = hold(param, protection.positions())
        before = param.detach().clone()
        with torch.no_grad():
            param.add_(torch.randn_like(param))
        moved = param.detach().clone()
        if held is not None:
            held.restore()
        where = dense > 0
        assert torch.equal(param.detach()[where], before[where])
        assert torch.equal(param.detach()[~where], moved[~where])  # free entries untouched
        if held is not None:  # compact: the values of the protected entries and little else
            assert held.reference.numel() == int(where.sum())
        grad = torch.randn_like(param)
        expected = grad * adjustment_rate(dense, mode, 0.25)
        assert torch.allclose(rate_hook(protection, mode, 0.25)(grad), expected, atol=1e-6)
        if mode == "hat":  # protected entries get exactly no gradient
            assert not rate_hook(protection, mode, 0.25)(grad)[where & (dense == 1)].any()


def test_cond_conv_protection_matches_the_dense_rule():
    from timm.layers import CondConv2d
    layer = CondConv2d(4, 6, 3, num_experts=3)
    out_mask, in_mask = (torch.rand(6) < 0.5).float(), (torch.rand(4) < 0.5).float()
    dense_w, _ = weight_protection(layer, out_mask, in_mask)
    weight, _ = protection_of(layer, out_mask, in_mask)
    held = hold(layer.weight, weight.positions())
    before = layer.weight.detach().clone()
    with torch.no_grad():
        layer.weight.add_(1.0)
    held.restore()
    assert torch.equal(layer.weight.detach()[dense_w > 0], before[dense_w > 0])
    assert torch.equal(layer.weight.detach()[dense_w == 0], before[dense_w == 0] + 1.0)


def test_guard_memory_follows_the_protected_entries():
    """After one task the guard holds about the protected share of the weights, not copies of
    every weight plus weight-sized masks and rates (3.4x the parameters before)."""
    torch.manual_seed(0)
    net = hatconvert.convert(timm.create_model("resnet18", num_classes=3), num_tasks=2)
    optimizer = torch.optim.AdamW(net.parameters(), lr=0.01, weight_decay=0.05)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 3, (4,))
    train(net, optimizer, 0, x, y, steps=2)
    reference = eval_out(net, x, 0)
    net.train()
    net.begin_task(1)
    protected = total = 0
    for tensor in net._guard.shared.values():
        total += tensor.numel()
    for item in net._guard.held:
        if any(item.tensor is t for t in net._guard.shared.values()):
            protected += item.reference.numel()
    param_bytes = sum(p.numel() * p.element_size() for p in net.parameters())
    ratio = net._guard.nbytes() / param_bytes
    assert 0 < protected < total
    assert ratio <= protected * 4 / param_bytes + 0.10
    for b in range(3):
        s = hatconvert.mask_scale(b, 3)
        loss = torch.nn.functional.cross_entropy(net(x, 1, s), y) + net.regularization(1, s)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    net.end_task()
    assert torch.equal(eval_out(net, x, 0), reference)
