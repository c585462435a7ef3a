"""The pruned export: a standalone torch.export program of one task without its closed units."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import hatconvert
from hatconvert.pruned import export_program
from helpers import train
from models import ResidualConcatNet

timm = pytest.importorskip("timm")


class DepthwiseSeparable(nn.Module):
    """Pointwise and depthwise convolutions with BatchNorm, pooled into a Linear head."""

    def __init__(self):
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.dw, self.bn1 = nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16)
        self.pw, self.bn2 = nn.Conv2d(16, 24, 1), nn.BatchNorm2d(24)
        self.head = nn.Linear(24, 3)

    def forward(self, x):
        x = F.relu(self.bn0(self.stem(x)))
        x = F.relu6(self.bn1(self.dw(x)))
        x = F.relu(self.bn2(self.pw(x)))
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


CASES = {
    "residual-concat": (lambda: ResidualConcatNet(3), (3, 16, 16)),
    "depthwise-separable": (DepthwiseSeparable, (3, 16, 16)),
    "timm-resnet18": (lambda: timm.create_model("resnet18", num_classes=3), (3, 32, 32)),
    "timm-vit": (lambda: timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8,
                                           depth=2, num_classes=3), (3, 32, 32)),
    "timm-mobilenetv3": (lambda: timm.create_model("mobilenetv3_small_050", num_classes=3),
                         (3, 32, 32)),
    "timm-swin": (lambda: timm.create_model("swin_tiny_patch4_window7_224", img_size=32,
                                            window_size=4, depths=(1, 1), embed_dim=16,
                                            num_heads=(2, 2), num_classes=3), (3, 32, 32)),
}


def trained(name: str, tasks: int = 2):
    """The network of ``name`` with 2 tasks, the first ``tasks`` trained a few steps."""
    build, shape = CASES[name]
    torch.manual_seed(0)
    net = hatconvert.convert(build(), num_tasks=2, num_classes=3)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=0.01)
    x, y = torch.randn(8, *shape), torch.randint(0, 3, (8,))
    for t in range(tasks):
        train(net, opt, t, x, y, steps=3)
    return net.eval(), shape


def flops(module, x) -> int:
    with FlopCounterMode(display=False) as counter:
        module(x)
    return counter.get_total_flops()


def parameters(module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("name", list(CASES))
def test_pruned_program_equals_the_task_and_is_smaller(name, tmp_path):
    net, shape = trained(name)
    path = tmp_path / "task1.pt2"
    probe = torch.randn(2, *shape)
    before, layout = net(probe, 0).detach(), repr(net)
    program = hatconvert.export(net, 1, path, prune=True)
    assert torch.equal(net(probe, 0), before) and repr(net) == layout  # the network untouched
    full = export_program(net, 1, prune=False).module()
    pruned = torch.export.load(path).module()
    x = torch.randn(5, *shape)  # another batch size than the example's
    with torch.no_grad():
        expected = net(x, 1)
        assert torch.allclose(pruned(x), expected, rtol=1e-4, atol=1e-5)
        assert torch.allclose(program.module()(x), expected, rtol=1e-4, atol=1e-5)
        assert torch.allclose(full(x), expected, rtol=1e-4, atol=1e-5)
        assert parameters(pruned) < 0.9 * parameters(full)
        assert flops(pruned, x) < 0.9 * flops(full, x)
    # the units kept are the ones task 1 opens: every gated Linear/conv of the network
    # had some closed
    used = [float(m.mean()) for m in net.masks(1).values()]
    assert min(used) < 1.0


def test_the_program_loads_and_runs_without_hatconvert_or_timm(tmp_path):
    net, shape = trained("timm-vit")
    path = tmp_path / "task0.pt2"
    hatconvert.export(net, 0, path, prune=True)
    x = torch.randn(3, *shape)
    torch.save(x, tmp_path / "x.pt")
    with torch.no_grad():
        torch.save(net(x, 0), tmp_path / "expected.pt")
    code = (
        "import sys\n"
        "sys.modules['hatconvert'] = None\nsys.modules['timm'] = None\n"  # imports would fail
        "import torch\n"
        f"m = torch.export.load({str(path)!r}).module()\n"
        f"x = torch.load({str(tmp_path / 'x.pt')!r})\n"
        f"e = torch.load({str(tmp_path / 'expected.pt')!r})\n"
        "print(torch.allclose(m(x), e, rtol=1e-4, atol=1e-5))\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=300)
    assert done.stdout.strip() == "True", done.stderr[-2000:]


def test_pruned_export_refuses_what_it_cannot_do(tmp_path):
    net, _ = trained("residual-concat", tasks=1)
    with pytest.raises(hatconvert.TaskError, match="not trained"):
        hatconvert.export(net, 1, tmp_path / "a.pt2", prune=True)
    never_run = hatconvert.convert(ResidualConcatNet(3), num_tasks=2, num_classes=3)
    with pytest.raises(hatconvert.ExportError, match="example call"):
        hatconvert.export(never_run, 0, tmp_path / "b.pt2", prune=True, allow_untrained=True)
    read_only = tmp_path / "kept.pt2"
    read_only.write_bytes(b"old")
    read_only.chmod(0o444)
    with pytest.raises(hatconvert.CheckpointError):
        hatconvert.export(net, 0, read_only, prune=True)
    assert read_only.read_bytes() == b"old"
    assert not (tmp_path / "a.pt2").exists() and not (tmp_path / "b.pt2").exists()


hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402
from random_graphs import build_model  # noqa: E402
from test_fuzz_forgetting import programs  # noqa: E402
from test_mixed import scramble  # noqa: E402


@settings(max_examples=15, deadline=None, derandomize=True, database=None, print_blob=False,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(program=programs(), seed=st.integers(0, 1000))
def test_random_program_pruned_export_equals_the_task(program, seed):
    """Random graphs (tests/random_graphs.py: in-place ops, norms over odd axes, reshapes,
    concatenations, grouped convs, ...) with random masks: the pruned program of a task equals
    the network on a batch of another size, or the export refuses with an ExportError."""
    try:
        net = hatconvert.convert(build_model(program, seed), num_tasks=2).eval()
        x = torch.randn((3,) + tuple(program.input_shape))
        with torch.no_grad():
            net(x, 0)
    except hatconvert.ConversionError:
        return
    scramble(net, seed)
    try:
        program_of_task = export_program(net, 0)
    except hatconvert.ExportError:
        return
    x2 = torch.randn((4,) + tuple(program.input_shape))
    with torch.no_grad():
        assert torch.allclose(program_of_task.module()(x2), net(x2, 0), rtol=1e-4, atol=1e-5,
                              equal_nan=True)


class SeparateProjections(nn.Module):
    """Attention written as BERT writes it: query, key and value Linears, ``view`` into heads,
    ``transpose``, ``scaled_dot_product_attention`` and back, then an output Linear."""

    def __init__(self, features=6, width=32, heads=4):
        super().__init__()
        self.heads = heads
        self.embed = nn.Linear(features, width)
        self.query, self.key, self.value = (nn.Linear(width, width) for _ in range(3))
        self.out, self.head = nn.Linear(width, width), nn.Linear(width, 3)

    def forward(self, x):
        b, n, _ = x.shape
        h = self.embed(x)
        q, k, v = (p(h).view(b, n, self.heads, -1).transpose(1, 2)
                   for p in (self.query, self.key, self.value))
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, -1)
        return self.head((h + self.out(a)).mean(1))


HEAD_CASES = {  # (build, input shape, the gates of the projection split into heads, heads)
    "timm-vit": (CASES["timm-vit"][0], (3, 32, 32), ["blocks_0_attn_qkv", "blocks_1_attn_qkv"],
                 3),
    "timm-vit-qk-norm": (lambda: timm.create_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=3, qk_norm=True),
        (3, 32, 32), ["blocks_0_attn_qkv", "blocks_1_attn_qkv"], 3),
    "separate-projections": (SeparateProjections, (5, 6), ["query", "key", "value"], 4),
}


def attention_heads(program) -> list[int]:
    """The head count of every attention the exported program runs (fused, or written out as
    a softmax over ``(batch, heads, queries, keys)`` scores)."""
    return [node.args[0].meta["val"].shape[1] for node in program.graph.nodes
            if "scaled_dot_product" in str(node.target) or "softmax" in str(node.target)]


def close_units(net, gate: str, units) -> None:
    with torch.no_grad():
        getattr(net.model.hat_gates, gate).embedding[1, units] = -4.0


@pytest.mark.parametrize("name", list(HEAD_CASES))
def test_attention_heads_whose_values_a_task_closes_are_removed(name, tmp_path):
    build, shape, gates, heads = HEAD_CASES[name]
    torch.manual_seed(0)
    net = hatconvert.convert(build(), num_tasks=2, num_classes=3)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    x, y = torch.randn(8, *shape), torch.randint(0, 3, (8,))
    for t in range(2):
        train(net, opt, t, x, y, steps=3)
    net.eval()
    trained_heads = attention_heads(export_program(net, 1))
    assert trained_heads and set(trained_heads) == {heads}  # every value head open after training
    width = getattr(net.model.hat_gates, gates[-1]).embedding.shape[1]
    head_dim = (width // 3 if name.startswith("timm-vit") else width) // heads
    if name.startswith("timm-vit"):  # (with qk_norm the query and key reach attention whole)  # block 0: head 1's value closed; block 1: all of head 0
        close_units(net, gates[0], range(2 * width // 3 + head_dim, 2 * width // 3 + 2 * head_dim))
        close_units(net, gates[1], [u for u in range(width) if (u // head_dim) % heads == 0])
    else:  # head 2's value and head 3's query closed (a zero query still attends)
        close_units(net, "value", range(2 * head_dim, 3 * head_dim))
        close_units(net, "query", range(3 * head_dim, 4 * head_dim))
    program = hatconvert.export(net, 1, tmp_path / "task1.pt2", prune=True)
    assert attention_heads(program) == [heads - 1] * (2 if name.startswith("timm-vit") else 1)
    assert attention_heads(export_program(net, 1, prune=False)) == attention_heads(
        export_program(net, 0, prune=False))
    x = torch.randn(3, *shape)
    with torch.no_grad():
        assert torch.allclose(torch.export.load(tmp_path / "task1.pt2").module()(x), net(x, 1),
                              rtol=1e-4, atol=1e-5)


@settings(max_examples=12, deadline=None, derandomize=True, database=None, print_blob=False)
@given(closed=st.lists(st.tuples(st.sampled_from(["query", "key", "value"]), st.integers(0, 3),
                                 st.sampled_from(["all", "half"])), max_size=6),
       seed=st.integers(0, 100))
def test_closing_any_units_of_any_heads_keeps_the_pruned_attention_exact(closed, seed):
    """Heads closed whole or in part, in the query, key or value: the program equals the task
    and runs one head per head with a value unit open."""
    torch.manual_seed(seed)
    net = hatconvert.convert(SeparateProjections(), num_tasks=2, num_classes=3).eval()
    x = torch.randn(4, 5, 6)
    with torch.no_grad():
        net(x, 0)
        for gate in ("query", "key", "value"):
            getattr(net.model.hat_gates, gate).embedding[1] = 1.0
    for gate, head, part in closed:
        close_units(net, gate, range(8 * head, 8 * head + (8 if part == "all" else 4)))
    masks = {gate: net.masks(1)[gate].bool().reshape(4, 8) for gate in ("query", "key", "value")}
    value_open = masks["value"].any(1)
    program = export_program(net, 1)
    assert attention_heads(program) == [int(value_open.sum()) or 4]  # none open: left whole
    if value_open.any():  # each kept head: the query/key dims where both are open, padded
        both = (masks["query"] & masks["key"])[value_open]
        expected = {"query": max(1, int(both.sum(1).max())), "key": max(1, int(both.sum(1).max())),
                    "value": int(masks["value"][value_open].sum(1).max())}
        assert projection_rows(program) == {g: w * int(value_open.sum())
                                            for g, w in expected.items()}
    x2 = torch.randn(3, 5, 6)
    with torch.no_grad():
        assert torch.allclose(program.module()(x2), net(x2, 1), rtol=1e-4, atol=1e-5)


def projection_rows(program) -> dict[str, int]:
    """Output rows of the program's query, key and value layers."""
    return {name.split("_m")[0]: w.shape[0] for name, w in program.module().state_dict().items()
            if name.split("_m")[0] in ("query", "key", "value") and name.endswith("weight")}


class PooledAttention(SeparateProjections):
    """Attention whose output is pooled over tokens per head before the merge, and whose query
    also feeds the residual stream: the first must be unpacked, the second left unpacked."""

    def forward(self, x):
        b, n, _ = x.shape
        h = self.embed(x)
        q, k, v = (p(h).view(b, n, self.heads, -1).transpose(1, 2)
                   for p in (self.query, self.key, self.value))
        pooled = F.scaled_dot_product_attention(q, k, v).mean(2).flatten(1)  # (b, heads * d)
        q2, k2, v2 = (p(h).view(b, n, self.heads, -1).transpose(1, 2)
                      for p in (self.out, self.key, self.value))
        mixed = F.scaled_dot_product_attention(q2, k2, v2).transpose(1, 2).reshape(b, n, -1)
        return self.head(pooled + (mixed + q2.transpose(1, 2).reshape(b, n, -1)).mean(1))


def test_packed_attention_is_exact_where_its_output_or_query_is_read_otherwise():
    torch.manual_seed(0)
    net = hatconvert.convert(PooledAttention(), num_tasks=2, num_classes=3).eval()
    x = torch.randn(4, 5, 6)
    with torch.no_grad():
        net(x, 0)
        for gate in ("query", "key", "value", "out"):
            getattr(net.model.hat_gates, gate).embedding[1] = 1.0
    for gate, units in (("query", range(0, 20)), ("key", range(4, 30)), ("value", [3, 9, 17, 25]),
                        ("out", range(8, 12))):
        close_units(net, gate, units)
    program = export_program(net, 1)
    # the first attention packs: query/key keep the dims both open, the value its open dims
    rows = [(k.split("_m")[0], w.shape[0]) for k, w in program.module().state_dict().items()
            if k.endswith("weight") and k.split("_m")[0] in ("query", "value")]
    assert ("query", 4 * 2) in rows and ("value", 4 * 7) in rows  # head 3 alone: 2 dims
    assert attention_heads(program) == [4, 4]
    x2 = torch.randn(3, 5, 6)
    with torch.no_grad():
        assert torch.allclose(program.module()(x2), net(x2, 1), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["timm-vit", "depthwise-separable"])
def test_an_onnx_name_writes_an_onnx_model_that_onnxruntime_runs(name, tmp_path):
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    net, shape = trained(name)
    path = tmp_path / "task1.onnx"
    hatconvert.export(net, 1, path, prune=True)
    session = ort.InferenceSession(str(path))
    x = torch.randn(5, *shape)  # another batch size than the example's
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        assert torch.allclose(torch.from_numpy(got), net(x, 1), rtol=1e-3, atol=1e-4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["task1.onnx"]  # no temporary left


def test_onnx_without_its_exporter_is_refused_before_any_work(tmp_path, monkeypatch):
    import importlib.util
    net, _ = trained("residual-concat", tasks=1)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "onnxscript" else real(name, *a))
    with pytest.raises(hatconvert.ExportError, match=r"task0\.onnx as ONNX needs onnxscript"):
        hatconvert.export(net, 0, tmp_path / "task0.onnx", prune=True)
    assert list(tmp_path.iterdir()) == []


def test_a_rounding_difference_is_accepted_once_float64_agrees(tmp_path, monkeypatch):
    """A float program of deep concatenations (inception_v3's) differs from the network by
    rounding (fewer terms summed, in another order); the check then prunes a float64 copy,
    which must agree to 1e-9. Here an error in the float32 weights alone stands in for it."""
    import hatconvert.pruned as pruned
    net, _ = trained("residual-concat")
    sliced, checked = pruned._sliced, pruned._equal_in_float64
    asked = []

    def off_in_float32_only(*args, **kwargs):
        layer = sliced(*args, **kwargs)
        if layer.weight.dtype == torch.float32:
            with torch.no_grad():
                layer.weight.mul_(1.001)
        return layer

    def spy(*args):
        asked.append(checked(*args))
        return asked[-1]
    monkeypatch.setattr(pruned, "_sliced", off_in_float32_only)
    monkeypatch.setattr(pruned, "_equal_in_float64", spy)
    hatconvert.export(net, 1, tmp_path / "task1.pt2", prune=True)
    assert asked == [True] and (tmp_path / "task1.pt2").exists()


def test_a_program_that_computes_something_else_is_refused(tmp_path, monkeypatch):
    import hatconvert.pruned as pruned
    net, _ = trained("residual-concat")
    sliced = pruned._sliced

    def off_by_a_thousandth(*args, **kwargs):
        layer = sliced(*args, **kwargs)
        with torch.no_grad():
            layer.weight.mul_(1.001)
        return layer
    monkeypatch.setattr(pruned, "_sliced", off_by_a_thousandth)
    with pytest.raises(hatconvert.ExportError, match="differs from the network"):
        hatconvert.export(net, 1, tmp_path / "wrong.pt2", prune=True)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name, prune", [("task0.onnx", False), ("task0.pt2", False),
                                         ("task0.safetensors", True)])
def test_a_file_name_of_the_other_format_is_refused_before_any_work(name, prune, tmp_path):
    """A hurried ``export(net, 0, "task0.onnx")`` would have written safetensors under an ONNX
    name: the name and the format must agree."""
    net, _ = trained("residual-concat", tasks=1)
    with pytest.raises(hatconvert.ExportError, match=name.replace(".", r"\.")):
        hatconvert.export(net, 0, tmp_path / name, prune=prune)
    assert list(tmp_path.iterdir()) == []


class ConvNormStack(nn.Module):
    """Convolutions into BatchNorms (one without an affine transform), a residual add."""

    def __init__(self):
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, 40, 3, padding=1), nn.BatchNorm2d(40)
        self.conv1, self.bn1 = nn.Conv2d(40, 40, 3, padding=1), nn.BatchNorm2d(40)
        self.conv2, self.bn2 = nn.Conv2d(40, 24, 1), nn.BatchNorm2d(24, affine=False)
        self.head = nn.Linear(24, 3)

    def forward(self, x):
        x = F.relu(self.bn0(self.stem(x)))
        x = x + F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


@pytest.mark.parametrize("open_units", [(13, 29, 11), (8, 40, 24), (1, 39, 17)])
def test_pruned_convolutions_keep_zero_rows_up_to_a_multiple_of_eight(open_units):
    """oneDNN runs blocks of 8 channels: a pruned convolution keeps closed units' zero rows up
    to a multiple of 8, the BatchNorm behind it is sliced the same way with those channels put
    out as zeros, and one that cannot be zeroed (no affine) runs whole; the output is exact."""
    from hatconvert.pruned import _pruned_graph
    torch.manual_seed(0)
    net = hatconvert.convert(ConvNormStack(), num_tasks=2, num_classes=3)
    x = torch.randn(8, 3, 8, 8)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    for t in range(2):
        train(net, opt, t, x, torch.randint(0, 3, (8,)), steps=2)
    widths = {"stem": 40, "conv1": 40, "conv2": 24}
    with torch.no_grad():
        for gate, keep in zip(widths, open_units):
            getattr(net.model.hat_gates, gate).embedding[1] = -4.0
            getattr(net.model.hat_gates, gate).embedding[1, :keep] = 4.0
    net.eval()
    graph = _pruned_graph(net, 1, x, True)
    convs = [m for m in graph.modules() if isinstance(m, nn.Conv2d)]
    norms = [m for m in graph.modules() if isinstance(m, nn.BatchNorm2d)]
    padded = [min(w, -(-k // 8) * 8) for w, k in zip(widths.values(), open_units)]
    assert sorted(c.out_channels for c in convs) == sorted(padded)
    assert sorted(n.num_features for n in norms if n.affine) == sorted(padded[:2])
    assert [n.num_features for n in norms if not n.affine] == [24]  # whole: cannot be zeroed
    with torch.no_grad():
        torch.testing.assert_close(graph(x), net(x, 1), rtol=1e-5, atol=1e-6)
