"""Bad arguments to convert and load: one clear sentence naming the thing at fault."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from safetensors.torch import save_file
from torch import nn

import hatconvert
from hatconvert import CheckpointError, ConversionError
from hatconvert.errors import one_line  # internal: the message shortener under test
from helpers import train
from models import ResidualConcatNet


def test_one_string_is_one_include_or_exclude_pattern():
    net = hatconvert.convert(ResidualConcatNet(), num_tasks=2, include="branch_*")
    assert sorted(net.layout.gated) == ["branch_a", "branch_b"]
    net = hatconvert.convert(ResidualConcatNet(), num_tasks=2, exclude="stem")
    assert "stem" not in net.layout.gated and "mix" in net.layout.gated
    assert net.config["include"] == [] and net.config["exclude"] == ["stem"]


@pytest.mark.parametrize("kwargs,match", [
    (dict(include=[3]), r"include must be a module-path pattern or a list of them, got \[3\]"),
    (dict(exclude=7), "exclude must be a module-path pattern or a list of them, got 7"),
    (dict(auto_leaves="yes"), "auto_leaves must be True or False, got 'yes'"),
])
def test_options_of_the_wrong_type_are_refused(kwargs, match):
    with pytest.raises(ConversionError, match=match):
        hatconvert.convert(ResidualConcatNet(), num_tasks=2, **kwargs)


def test_a_one_layer_model_says_the_layer_is_the_head():
    with pytest.raises(ConversionError, match="single Linear layer.*nn.Sequential.*head=False"):
        hatconvert.convert(nn.Linear(4, 3), num_tasks=2)
    with pytest.raises(ConversionError, match="its only weighted layer '0' is the head.*"
                                              "head=False"):
        hatconvert.convert(nn.Sequential(nn.Linear(4, 3)), num_tasks=2)
    net = hatconvert.convert(nn.Sequential(nn.Linear(4, 3)), num_tasks=2, head=False)
    assert list(net.layout.gated) == ["0"]


def test_a_model_without_layers_says_so():
    with pytest.raises(ConversionError, match="Sequential has no Linear or convolution layer"):
        hatconvert.convert(nn.Sequential(nn.ReLU()), num_tasks=2)


def test_an_already_converted_network_is_refused():
    net = hatconvert.convert(ResidualConcatNet(), num_tasks=2)
    for model in (net, net.model, nn.Sequential(net.model)):
        with pytest.raises(ConversionError, match="is already a HAT network"):
            hatconvert.convert(model, num_tasks=2)


def test_weights_that_are_a_directory_or_a_checkpoint_are_named(tmp_path):
    with pytest.raises(ConversionError, match=f"weights '{tmp_path}' is a directory"):
        hatconvert.convert("resnet18", num_tasks=2, weights=tmp_path)
    checkpoint = tmp_path / "hat.safetensors"
    hatconvert.save(hatconvert.convert("resnet18", num_tasks=2), checkpoint)
    with pytest.raises(ConversionError) as info:
        hatconvert.convert("resnet18", num_tasks=2, weights=checkpoint)
    assert "hat.safetensors' is a hatconvert checkpoint, not pretrained weights" in \
        str(info.value) and "hatconvert.load" in str(info.value)
    assert len(str(info.value)) < 300


def test_weights_of_another_model_list_a_few_keys_on_one_line(tmp_path):
    other = tmp_path / "resnet34.safetensors"
    save_file(timm.create_model("resnet34").state_dict(), str(other))
    with pytest.raises(ConversionError) as info:
        hatconvert.convert("resnet18", num_tasks=2, weights=other)
    message = str(info.value)
    assert "resnet34.safetensors" in message and "Unexpected key(s)" in message
    assert "\n" not in message and len(message) < 600 and "in all)" in message


def test_one_line_cuts_key_lists_and_joins_lines():
    keys = ", ".join(f'"layer.{i}.weight"' for i in range(100))
    text = f"Error(s) in loading state_dict for Net:\n\tMissing key(s) in state_dict: {keys}."
    assert one_line(text) == ('Error(s) in loading state_dict for Net: Missing key(s) in '
                              'state_dict: "layer.0.weight", "layer.1.weight", "layer.2.weight", '
                              '"layer.3.weight", "layer.4.weight", ... (100 in all).')
    assert one_line("a\n\nb\nc") == "a; b; c"


# -- load ---------------------------------------------------------------------------------------
@pytest.fixture
def saved(tmp_path):
    net = hatconvert.convert(ResidualConcatNet(), num_tasks=2)
    net.eval()(torch.randn(1, 3, 16, 16), 0)
    path = tmp_path / "good.safetensors"
    hatconvert.save(net, path)
    return path


def with_example(src, dst, example):
    from safetensors import safe_open
    with safe_open(str(src), "pt") as f:
        meta = dict(f.metadata(), example=json.dumps(example))
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(dst), metadata=meta)


@pytest.mark.parametrize("example,match", [
    ({"shape": [1, -3, 16, 16], "dtype": "float32"}, "every dimension must be an int >= 0"),
    ({"shape": [1, 3, 16.5, 16], "dtype": "float32"}, "every dimension must be an int >= 0"),
    ({"shape": [100000, 3, 4096, 4096], "dtype": "float32"}, "more elements than one input"),
    ({"shape": [0, 10 ** 30], "dtype": "float32"}, "more elements than one input"),
    ({"shape": "1,3,16,16", "dtype": "float32"}, "expected a shape list and a dtype name"),
    ({"shape": [1, 3, 16, 16], "dtype": "Tensor"}, "dtype 'Tensor' is not a floating"),
    ({"shape": [1, 3, 16, 16], "dtype": "complex64"}, "dtype 'complex64' is not a floating"),
])
def test_an_edited_example_input_is_refused(saved, tmp_path, example, match):
    edited = tmp_path / "edited.safetensors"
    with_example(saved, edited, example)
    with pytest.raises(CheckpointError, match=f"edited.safetensors' has a damaged header.*{match}"):
        hatconvert.load(edited, model=ResidualConcatNet())


class Tokens(nn.Module):
    """Token ids into an embedding: an integer example input is right here."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.fc = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(torch.relu(self.fc(self.embed(x).mean(1))))


def test_an_integer_example_is_refused_only_where_the_first_layer_takes_floats(saved, tmp_path):
    edited = tmp_path / "int.safetensors"
    with_example(saved, edited, {"shape": [1, 3, 16, 16], "dtype": "int64"})
    with pytest.raises(CheckpointError, match="int.safetensors' has a damaged header: its example "
                                              "input is torch.int64 but the network's first "
                                              "layer 'stem' takes floating-point input"):
        hatconvert.load(edited, model=ResidualConcatNet())
    net = hatconvert.convert(Tokens(), num_tasks=2, mask_init="normal")
    tokens = torch.randint(0, 10, (4, 5))
    train(net, torch.optim.SGD(net.parameters(), lr=0.1), 0, tokens, torch.tensor([0, 1, 2, 0]))
    hatconvert.save(net, tmp_path / "tokens.safetensors")
    loaded = hatconvert.load(tmp_path / "tokens.safetensors", model=Tokens())
    assert loaded.example_spec() == ((1, 5), torch.int64)
    assert loaded.capacity() == net.capacity() < 1.0  # masks propagate from the token ids


def test_an_unknown_device_is_named_before_anything_is_built(saved, monkeypatch):
    def no_rebuild(*args, **kwargs):
        raise AssertionError("the network must not be built")
    monkeypatch.setattr("hatconvert.checkpoint.rebuild", no_rebuild)
    with pytest.raises(CheckpointError, match="unknown device 'bogus'"):
        hatconvert.load(saved, model=ResidualConcatNet(), device="bogus")
    with pytest.raises(CheckpointError, match="unknown device 3.5"):
        hatconvert.load(saved, model=ResidualConcatNet(), device=3.5)


def test_paths_and_models_of_the_wrong_type_are_named(saved):
    net = hatconvert.load(saved, model=ResidualConcatNet())
    with pytest.raises(CheckpointError, match="a file path must be a str or os.PathLike, got "
                                              "NoneType"):
        hatconvert.load(None)
    with pytest.raises(CheckpointError, match="a file path must be a str or os.PathLike, got int"):
        hatconvert.save(net, 5)
    with pytest.raises(CheckpointError, match="cannot write a file with an empty name"):
        hatconvert.save(net, "")
    with pytest.raises(CheckpointError, match="model= must be the original architecture as an "
                                              "nn.Module, got str"):
        hatconvert.load(saved, model="resnet18")
