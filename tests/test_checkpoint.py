"""Checkpoints (save/load), per-task export and forgetting."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from timm.layers import BatchNormAct2d
from torch import nn

import hatconvert
from hatconvert import CheckpointError, ExportError, TaskError
from helpers import train as shared_train
from models import ResidualConcatNet, SequenceNet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train(net, optimizer, task, x, y, steps=3):
    shared_train(net, optimizer, task, x, y, steps)


def outputs(net, x, tasks):
    net.eval()
    with torch.no_grad():
        return [net(x, t) for t in tasks]


def trained_net(model, classes, shape, tasks=2, num_tasks=3):
    """A converted network with ``tasks`` tasks trained briefly, and its input."""
    net = hatconvert.convert(model, num_tasks=num_tasks, num_classes=classes)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    x = torch.randn(*shape)
    for t in range(tasks):
        train(net, optimizer, t, x, torch.randint(0, classes[t], (shape[0],)))
    return net, x


class SequenceNetWithHead(SequenceNet):
    def __init__(self, classes: int = 3):
        super().__init__()
        self.head = nn.Linear(10, classes)


class GroupedNet(nn.Module):
    """Grouped ConvTranspose, a one-channel-per-group GroupNorm and a BatchNormAct2d."""

    def __init__(self, classes: int = 3, act: type = nn.SiLU, affine: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.gn = nn.GroupNorm(8, 8)
        self.up = nn.ConvTranspose2d(8, 6, 2, stride=2, groups=2)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.bnact = BatchNormAct2d(6, act_layer=act) if affine else nn.BatchNorm2d(6, affine=False)
        self.fc = nn.Linear(6, classes)

    def forward(self, x):
        x = F.relu(self.gn(self.conv(x)))
        x = self.bnact(self.conv2(F.relu(self.up(x))))
        return self.fc(x.mean((2, 3)))


# -- round trips -----------------------------------------------------------------------------
ROUND_TRIP_SCRIPT = textwrap.dedent("""
    import sys
    import torch
    import torch.nn.functional as F
    from safetensors.torch import load_file, save_file
    import hatconvert

    torch.set_num_threads(int(sys.argv[4]))
    torch.manual_seed(1)
    net = hatconvert.load(sys.argv[1])
    x = load_file(sys.argv[2])["x"]
    out = {}
    with torch.no_grad():
        out.update({f"reloaded{t}": net(x, t) for t in (0, 1)})
    out["capacity"] = torch.tensor(net.capacity(), dtype=torch.float64)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    net.train()
    net.begin_task(2)
    for b in range(3):
        s = hatconvert.mask_scale(b, 3)
        loss = F.cross_entropy(net(x, 2, s), torch.tensor([0, 1, 2, 3]))
        loss = loss + net.regularization(2, s)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    net.end_task()
    net.eval()
    with torch.no_grad():
        out.update({f"after{t}": net(x, t) for t in (0, 1, 2)})
    out["capacity_after"] = torch.tensor(net.capacity(), dtype=torch.float64)
    save_file({k: v.contiguous() for k, v in out.items()}, sys.argv[3])
""")


def test_timm_round_trip_in_a_fresh_process_then_training_goes_on(tmp_path):
    net, x = trained_net("resnet18", [3, 4, 5], (4, 3, 32, 32))
    expected = outputs(net, x, (0, 1))
    path, inputs, result = (tmp_path / n for n in ("net.safetensors", "x.safetensors",
                                                   "out.safetensors"))
    hatconvert.save(net, path)
    save_file({"x": x}, str(inputs))
    script = tmp_path / "reload.py"
    script.write_text(ROUND_TRIP_SCRIPT)
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, str(script), str(path), str(inputs), str(result),
                           str(torch.get_num_threads())], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    got = load_file(str(result))
    for t in (0, 1):
        assert torch.equal(got[f"reloaded{t}"], expected[t])
        assert torch.equal(got[f"after{t}"], expected[t])  # task 2 trained after the reload
    assert got["capacity"].item() == pytest.approx(net.capacity())
    assert got["capacity_after"].item() < got["capacity"].item()  # task 2 took free capacity
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["tasks_trained"]) == [0, 1]
    assert json.loads(meta["source"]) == {"kind": "timm", "name": "resnet18", "kwargs": {}}
    assert json.loads(meta["classes_per_task"]) == [3, 4, 5]
    assert json.loads(meta["example"]) == {"shape": [1, 3, 32, 32], "dtype": "float32"}
    assert json.loads(meta["config"])["num_classes"] == [3, 4, 5]


@pytest.mark.parametrize("factory,shape", [(ResidualConcatNet, (4, 3, 16, 16)),
                                           (SequenceNetWithHead, (4, 2, 8))])
def test_custom_model_round_trip_restores_everything(tmp_path, factory, shape):
    net, x = trained_net(factory(), [3, 4, 4], shape)
    expected = outputs(net, x, (0, 1))
    path = tmp_path / "net.safetensors"
    hatconvert.save(net, path)
    loaded = hatconvert.load(path, model=factory())
    assert not loaded.training
    state = net.state_dict()
    assert loaded.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in loaded.state_dict().items())
    assert loaded.trained_tasks() == [0, 1] and loaded.example_spec() == net.example_spec()
    assert loaded.capacity() == net.capacity()  # protection works right after loading
    train(loaded, torch.optim.AdamW(loaded.parameters(), lr=0.05, weight_decay=0.05), 2, x,
          torch.randint(0, 4, (shape[0],)))
    after = outputs(loaded, x, (0, 1))
    assert all(torch.equal(a, e) for a, e in zip(after, expected))


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 6)
        self.b = nn.Linear(6, 6)
        self.b.weight = self.a.weight
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.relu(self.b(torch.relu(self.a(x)))))


def test_tied_weights_are_stored_once_and_tied_again(tmp_path):
    net = hatconvert.convert(Tied(), num_tasks=2)
    assert net.model.a.weight is net.model.b.weight
    net.eval()(torch.randn(2, 6), 0)  # one forward: the example input
    path = tmp_path / "tied.safetensors"
    hatconvert.save(net, path)
    with safe_open(str(path), "pt") as f:
        stored = set(f.keys())
        aliases = json.loads(f.metadata()["aliases"])
    assert len(stored) == len(net.state_dict()) - 1 and len(aliases) == 1
    loaded = hatconvert.load(path, model=Tied())
    assert loaded.model.a.weight is loaded.model.b.weight
    assert torch.equal(loaded.model.b.weight, net.model.b.weight)


def test_a_network_in_another_float_dtype_keeps_it(tmp_path):
    net = hatconvert.convert(ResidualConcatNet(), num_tasks=2).double().eval()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    expected = net(x, 1)
    hatconvert.save(net, tmp_path / "f64.safetensors")
    loaded = hatconvert.load(tmp_path / "f64.safetensors", model=ResidualConcatNet())
    assert loaded.example_spec() == ((1, 3, 16, 16), torch.float64)
    assert torch.equal(loaded(x, 1), expected)


# -- corrupt input and failed writes ----------------------------------------------------------
@pytest.fixture
def saved(tmp_path):
    net = hatconvert.convert(ResidualConcatNet(), num_tasks=2)
    net.eval()(torch.randn(1, 3, 16, 16), 0)
    path = tmp_path / "good.safetensors"
    hatconvert.save(net, path)
    return net, path


def test_truncated_file(saved, tmp_path):
    data = saved[1].read_bytes()
    for cut in (len(data) // 2, 20, 5):
        bad = tmp_path / f"cut{cut}.safetensors"
        bad.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match=f"cut{cut}.safetensors.*(truncated|only)"):
            hatconvert.load(bad, model=ResidualConcatNet())


def test_damaged_header(saved, tmp_path):
    data = bytearray(saved[1].read_bytes())
    data[8:12] = b"#!%&"  # the JSON header no longer parses
    bad = tmp_path / "header.safetensors"
    bad.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="header.safetensors' has a damaged header"):
        hatconvert.load(bad, model=ResidualConcatNet())


def test_text_file(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("these are not the weights you are looking for\n" * 20)
    with pytest.raises(CheckpointError, match="notes.txt' is not a safetensors file"):
        hatconvert.load(text)


def test_missing_file_and_foreign_safetensors(tmp_path):
    with pytest.raises(CheckpointError, match="missing.safetensors' does not exist"):
        hatconvert.load(tmp_path / "missing.safetensors")
    plain = tmp_path / "plain.safetensors"
    save_file(ResidualConcatNet().state_dict(), str(plain))
    with pytest.raises(CheckpointError, match="plain.safetensors' .*not a hatconvert checkpoint"):
        hatconvert.load(plain, model=ResidualConcatNet())


def rewrite_metadata(src, dst, **changes):
    with safe_open(str(src), "pt") as f:
        meta = dict(f.metadata(), **changes)
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(dst), metadata=meta)


def test_unknown_format_version(saved, tmp_path):
    future = tmp_path / "future.safetensors"
    rewrite_metadata(saved[1], future, format_version="99")
    with pytest.raises(CheckpointError, match="future.safetensors' has .*format version 99"):
        hatconvert.load(future, model=ResidualConcatNet())


def test_another_architecture(saved):
    with pytest.raises(CheckpointError, match="good.safetensors' does not fit.*SequenceNet given"):
        hatconvert.load(saved[1], model=SequenceNet())
    no_bias = ResidualConcatNet()
    no_bias.mix = nn.Conv2d(12, 6, 3, stride=2, padding=1, bias=False)
    with pytest.raises(CheckpointError, match="does not fit.*1 unexpected keys \\(model.mix.bias"):
        hatconvert.load(saved[1], model=no_bias)
    wider = ResidualConcatNet()
    wider.fc, wider.ln, wider.out = nn.Linear(96, 20), nn.LayerNorm(20), nn.Linear(20, 5)
    with pytest.raises(CheckpointError, match="does not fit.*'model.fc.(weight|bias)' has shape"):
        hatconvert.load(saved[1], model=wider)
    with pytest.raises(CheckpointError, match="custom model \\(ResidualConcatNet\\).*model="):
        hatconvert.load(saved[1])


def test_timm_checkpoint_of_another_architecture(tmp_path):
    hatconvert.save(hatconvert.convert("resnet18", num_tasks=2), tmp_path / "r18.safetensors")
    other = tmp_path / "claims-resnet34.safetensors"
    rewrite_metadata(tmp_path / "r18.safetensors", other, source=json.dumps(
        {"kind": "timm", "name": "resnet34", "kwargs": {}}))
    with pytest.raises(CheckpointError, match="claims-resnet34.safetensors' does not fit .*"
                                              "saved from resnet34: .* missing keys"):
        hatconvert.load(other)


def test_failed_save_never_overwrites_the_target(saved, monkeypatch):
    net, path = saved
    before = path.read_bytes()
    net.begin_task(1)
    with pytest.raises(CheckpointError, match="task 1 is being trained"):
        hatconvert.save(net, path)
    net.end_task()

    def crash(tensors, tmp, meta, target):
        with open(tmp, "wb") as f:
            f.write(b"half a file")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr("hatconvert.checkpoint.write_safetensors", crash)
    with pytest.raises(CheckpointError, match="good.safetensors'.*No space left"):
        hatconvert.save(net, path)
    assert path.read_bytes() == before
    assert sorted(os.listdir(path.parent)) == ["good.safetensors"]  # no temporary file left


# -- export -----------------------------------------------------------------------------------
EXPORT_CASES = {
    "resnet18": (lambda n: timm.create_model("resnet18", num_classes=n), (4, 3, 32, 32)),
    "vit_tiny_patch16_224": (lambda n: timm.create_model("vit_tiny_patch16_224", num_classes=n),
                             (2, 3, 224, 224)),
    "residual-concat": (lambda n: ResidualConcatNet(classes=n), (4, 3, 16, 16)),
    "sequence": (lambda n: SequenceNetWithHead(n), (4, 2, 8)),
    "grouped": (lambda n: GroupedNet(n), (4, 3, 8, 8)),
}


@pytest.mark.parametrize("name", list(EXPORT_CASES))
def test_export_equals_the_hat_network_for_each_task(tmp_path, name):
    factory, shape = EXPORT_CASES[name]
    classes = [3, 5, 4]
    source = name if name in ("resnet18", "vit_tiny_patch16_224") else factory(4)
    tasks = (0,) if name.startswith("vit") else (0, 1)  # ViT at 224x224 is slow on a CPU
    net, x = trained_net(source, classes, shape, tasks=len(tasks))
    expected = outputs(net, x, tasks)
    for t in tasks:
        path = tmp_path / f"task{t}.safetensors"
        state = hatconvert.export(net, task_id=t, path=path)
        model = factory(classes[t]).eval()
        assert list(state) == list(model.state_dict())
        model.load_state_dict(load_file(str(path)))
        with torch.no_grad():
            assert (model(x) - expected[t]).abs().max().item() <= 1e-5
        if isinstance(source, str):  # timm reads the file as pretrained weights
            # num_classes in the overlay too: else timm drops a head whose size is not the cfg's
            pretrained = timm.create_model(source, num_classes=classes[t], pretrained=True,
                                           pretrained_cfg_overlay=dict(file=str(path),
                                                                       num_classes=classes[t]))
            with torch.no_grad():
                assert (pretrained.eval()(x) - expected[t]).abs().max().item() <= 1e-5
    closed = [p for p, m in net.masks(0).items() if not bool(m.all())]
    assert closed, "the test needs closed units for the folding to matter"


def test_export_covers_every_gate_mode():
    modes = set()
    for model in (ResidualConcatNet(), SequenceNet(), GroupedNet()):
        layout = hatconvert.convert(model, num_tasks=2).layout
        modes |= {(g.mode, g.norm is not None) for g in layout.gated.values()}
    assert modes == {("norm", True), ("weight", False), ("output", False), ("output", True)}


def test_export_refuses_an_untrained_task_unless_allowed(tmp_path):
    net, x = trained_net(ResidualConcatNet(), [3, 3, 3], (2, 3, 16, 16), tasks=1)
    with pytest.raises(TaskError, match="task 2 is not trained"):
        hatconvert.export(net, 2, tmp_path / "t2.safetensors")
    assert not (tmp_path / "t2.safetensors").exists()
    state = hatconvert.export(net, 2, allow_untrained=True)
    model = ResidualConcatNet(classes=3).eval()
    model.load_state_dict(state)
    with torch.no_grad():
        assert (model(x) - outputs(net, x, [2])[0]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("kwargs,match", [
    (dict(act=nn.Sigmoid), "'conv2' into norm 'bnact'.*Sigmoid does not map 0 to 0"),
    (dict(affine=False), "'conv2' into norm 'bnact'.*BatchNorm2d.*no affine"),
])
def test_export_refuses_norms_that_cannot_hold_a_closed_unit(kwargs, match):
    net, _ = trained_net(GroupedNet(**kwargs), [3, 3, 3], (2, 3, 8, 8), tasks=1)
    with pytest.raises(ExportError, match=match):
        hatconvert.export(net, 0)


def test_export_refuses_tied_weights_that_masks_split():
    torch.manual_seed(2)
    net = hatconvert.convert(Tied(), num_tasks=1, mask_init="normal")
    net.eval()(torch.randn(2, 6), 0)
    net.begin_task(0)
    net.end_task()
    if torch.equal(net.masks(0)["a"], net.masks(0)["b"]):
        pytest.skip("the random masks happen to agree")
    with pytest.raises(ExportError, match="'a.weight' and 'b.weight' are one tied tensor"):
        hatconvert.export(net, 0)


# -- forgetting -------------------------------------------------------------------------------
def test_forget_frees_capacity_and_keeps_other_tasks_bit_identical():
    net, x = trained_net(ResidualConcatNet(), [3] * 4, (4, 3, 16, 16), tasks=3, num_tasks=4)
    expected = outputs(net, x, (0, 2))
    before = net.capacity()
    gained = net.forget(1)
    assert gained > 0 and net.capacity() == pytest.approx(before + gained)
    assert net.trained_tasks() == [0, 2]
    assert all(torch.equal(a, e) for a, e in zip(outputs(net, x, (0, 2)), expected))
    with pytest.raises(TaskError, match="task 1 is not trained"):
        net.forget(1)
    net.begin_task(3)
    with pytest.raises(TaskError, match="task 3 is being trained"):
        net.forget(0)
    net.end_task()
    # the freed units can be trained again without touching tasks 0 and 2
    train(net, torch.optim.Adam(net.parameters(), lr=0.05), 1, x, torch.randint(0, 3, (4,)))
    assert all(torch.equal(a, e) for a, e in zip(outputs(net, x, (0, 2)), expected))


# -- file permissions, weights never read again, other dtypes --------------------------------
@pytest.fixture
def umask():
    """Set the process umask for one test and put the old one back."""
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


def mode(path) -> int:
    return os.stat(path).st_mode & 0o777


def test_written_files_follow_the_umask_or_keep_the_replaced_files_mode(saved, tmp_path, umask):
    net, _ = saved
    umask(0o022)
    hatconvert.save(net, tmp_path / "new.safetensors")
    assert mode(tmp_path / "new.safetensors") == 0o644
    umask(0o002)
    hatconvert.export(net, 0, tmp_path / "task0.safetensors", allow_untrained=True)
    assert mode(tmp_path / "task0.safetensors") == 0o664
    os.chmod(tmp_path / "new.safetensors", 0o640)
    hatconvert.save(net, tmp_path / "new.safetensors")
    assert mode(tmp_path / "new.safetensors") == 0o640
    os.chmod(tmp_path / "task0.safetensors", 0o604)
    hatconvert.export(net, 0, tmp_path / "task0.safetensors", allow_untrained=True)
    assert mode(tmp_path / "task0.safetensors") == 0o604


def test_a_read_only_file_is_never_replaced(saved, tmp_path):
    net, path = saved
    before = path.read_bytes()
    os.chmod(path, 0o444)
    with pytest.raises(CheckpointError, match="cannot write '.*good.safetensors': the file is "
                                              "read-only"):
        hatconvert.save(net, path)
    with pytest.raises(CheckpointError, match="good.safetensors': the file is read-only"):
        hatconvert.export(net, 0, path, allow_untrained=True)
    assert path.read_bytes() == before and mode(path) == 0o444
    assert sorted(os.listdir(tmp_path)) == ["good.safetensors"]


def test_loading_never_reads_the_pretrained_weights_again(tmp_path):
    source = timm.create_model("resnet18", num_classes=4)
    with torch.no_grad():
        source.conv1.weight.mul_(2.0)
    weights = tmp_path / "pretrained.safetensors"
    save_file(source.state_dict(), str(weights))
    net = hatconvert.convert("resnet18", num_tasks=2, num_classes=4, pretrained=True,
                             pretrained_cfg_overlay=dict(file=str(weights)))
    assert torch.equal(net.model.conv1.weight, source.conv1.weight)
    hatconvert.save(net, tmp_path / "hat.safetensors")
    with safe_open(str(tmp_path / "hat.safetensors"), "pt") as f:
        stored = json.loads(f.metadata()["source"])["kwargs"]
    assert "pretrained" not in stored
    weights.unlink()  # loading must not need the file, nor a download
    loaded = hatconvert.load(tmp_path / "hat.safetensors")
    assert torch.equal(loaded.model.conv1.weight, source.conv1.weight)
    older = tmp_path / "older.safetensors"  # written before weight kwargs were left out
    rewrite_metadata(tmp_path / "hat.safetensors", older, source=json.dumps(
        {"kind": "timm", "name": "resnet18", "kwargs": {"pretrained": True, "num_classes": 4,
                                                        "checkpoint_path": str(weights)}}))
    assert torch.equal(hatconvert.load(older).model.conv1.weight, source.conv1.weight)


def test_a_half_precision_network_propagates_masks_after_loading(tmp_path):
    net, x = trained_net(ResidualConcatNet(), [3, 3, 3], (2, 3, 16, 16), tasks=1)
    capacity = net.capacity()
    net.half()  # after the float32 forward that recorded the example input
    hatconvert.save(net, tmp_path / "half.safetensors")
    loaded = hatconvert.load(tmp_path / "half.safetensors", model=ResidualConcatNet())
    assert loaded.example_spec() == ((1, 3, 16, 16), torch.float16)
    assert loaded.capacity() == pytest.approx(capacity)
    assert loaded.forget(0) > 0
