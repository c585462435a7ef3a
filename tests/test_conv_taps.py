"""Convolution taps that read only padding: cut from the pruned export, the numbers unchanged."""

import pytest
import torch
from torch import nn

import hatconvert
from hatconvert.conv_taps import without_padding_taps
from hatconvert.pruned import export_program

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings, strategies as st  # noqa: E402

CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


@settings(max_examples=150, deadline=None, derandomize=True, database=None, print_blob=False)
@given(dims=st.sampled_from([1, 2, 3]), kernel=st.integers(1, 7), stride=st.integers(1, 3),
       padding=st.integers(0, 4), dilation=st.integers(1, 2), depthwise=st.booleans(),
       sizes=st.lists(st.integers(1, 9), min_size=3, max_size=3), seed=st.integers(0, 99))
def test_cutting_taps_never_changes_a_convolution(dims, kernel, stride, padding, dilation,
                                                  depthwise, sizes, seed):
    torch.manual_seed(seed)
    conv = CONVS[dims](4, 4, kernel, stride, padding, dilation, groups=4 if depthwise else 1)
    x = torch.randn(2, 4, *sizes[:dims])
    try:
        expected = conv(x)
    except RuntimeError:  # the kernel does not fit the padded input
        return
    cut = without_padding_taps(conv, tuple(x.shape))
    assert all(a <= b for a, b in zip(cut.kernel_size, conv.kernel_size))
    with torch.no_grad():
        got = cut(x)
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6)
    if cut is not conv:
        assert cut.weight.data_ptr() != conv.weight.data_ptr()  # the original is left alone
        assert conv.kernel_size == (kernel,) * dims


def test_a_seven_by_seven_convolution_on_one_pixel_keeps_its_centre():
    conv = nn.Conv2d(5, 5, 7, padding=3, groups=5)
    weight = conv.weight.detach().clone()
    cut = without_padding_taps(conv, (3, 5, 1, 1))
    assert cut.kernel_size == (1, 1) and cut.padding == (0, 0)
    assert torch.equal(cut.weight, weight[:, :, 3:4, 3:4])
    assert torch.equal(conv.weight, weight)
    assert without_padding_taps(conv, (3, 5, 9, 9)) is conv  # every tap reads the image
    assert without_padding_taps(nn.Conv2d(5, 5, 7, padding=3, padding_mode="reflect"),
                                (3, 5, 1, 1)).kernel_size == (7, 7)


class SmallMaps(nn.Module):
    """A stem down to 2x2 maps, then a ConvNeXt-like depthwise 7x7 and pointwise layers."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 12, 4, stride=4)
        self.dw = nn.Conv2d(12, 12, 7, padding=3, groups=12)
        self.pw = nn.Conv2d(12, 16, 1)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.pw(torch.relu(self.dw(x)))[:, :12]
        return self.head(torch.cat([x, x[:, :4]], 1).mean((2, 3)))


def test_the_pruned_program_cuts_taps_and_stays_exact():
    torch.manual_seed(0)
    net = hatconvert.convert(SmallMaps(), num_tasks=2, num_classes=3).eval()
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        net(x, 0)
        net.model.hat_gates.dw.embedding[0, :5] = -3.0  # a few channels closed
    for prune in (True, False):
        program = export_program(net, 0, prune=prune)
        kernels = {tuple(w.shape[2:]) for k, w in program.module().state_dict().items()
                   if k.startswith("dw") and k.endswith("weight")}
        assert kernels == {(3, 3)}  # on 2x2 maps only the central 3x3 taps read the image
        x2 = torch.randn(3, 3, 8, 8)
        with torch.no_grad():
            assert torch.allclose(program.module()(x2), net(x2, 0), rtol=1e-4, atol=1e-5)
