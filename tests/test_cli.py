"""The ``hatconvert`` command, run as ``python -m hatconvert`` in subprocesses."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file

import hatconvert
from hatconvert.cli import main  # the command's entry point, as the console script calls it
from models import ResidualConcatNet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = [3, 5, 4]


def run_all(*commands: list[str]) -> list[subprocess.CompletedProcess]:
    """Run ``python -m hatconvert ARGS`` for each argument list, side by side."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    procs = [subprocess.Popen([sys.executable, "-m", "hatconvert", *map(str, args)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for args in commands]
    results = []
    for args, proc in zip(commands, procs):
        out, err = proc.communicate(timeout=300)
        results.append(subprocess.CompletedProcess(args, proc.returncode, out, err))
    return results


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A resnet18 HAT checkpoint with tasks 0 and 1 trained, the network and an input."""
    torch.manual_seed(0)
    net = hatconvert.convert("resnet18", num_tasks=3, num_classes=CLASSES)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    x = torch.randn(4, 3, 32, 32)
    for t in (0, 1):
        net.train()
        net.begin_task(t)
        for b in range(3):
            s = hatconvert.mask_scale(b, 3)
            y = torch.randint(0, CLASSES[t], (4,))
            loss = F.cross_entropy(net(x, t, s), y) + net.regularization(t, s)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        net.end_task()
    path = tmp_path_factory.mktemp("cli") / "resnet18-hat.safetensors"
    hatconvert.save(net, path)
    return net.eval(), x, path


def test_help_for_the_command_and_each_subcommand(capsys):
    (result,) = run_all(["--help"])
    assert result.returncode == 0, result.stderr
    assert all(c in result.stdout for c in ("convert", "inspect", "export", "forget"))
    expected = {"convert": ("--num-tasks", "--weights", "--mask-init", "-o"),
                "inspect": ("--plot",), "export": ("--task", "--allow-untrained", "-o"),
                "forget": ("--task", "-o")}
    for command, words in expected.items():  # in this process: argparse prints and exits 0
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        out = capsys.readouterr().out
        assert exit_info.value.code == 0 and all(w in out for w in words), (command, out)


def test_convert_inspect_export_forget(trained, tmp_path):
    net, x, path = trained
    source = timm.create_model("resnet18")
    with torch.no_grad():
        source.conv1.weight.mul_(2.0)
    weights = tmp_path / "resnet18.safetensors"
    save_file(source.state_dict(), str(weights))
    converted, exported, forgotten, plot = (tmp_path / n for n in (
        "converted.safetensors", "task1.safetensors", "forgot0.safetensors", "usage.png"))
    conv, insp, exp, forg = run_all(
        ["convert", "resnet18", "--num-tasks", 3, "--num-classes", *CLASSES, "--weights",
         weights, "--mask-init", "dense", "-o", converted],
        ["inspect", path, "--plot", plot],
        ["export", path, "--task", 1, "-o", exported],
        ["forget", path, "--task", 0, "-o", forgotten])
    for result in (conv, insp, exp, forg):
        assert result.returncode == 0, (result.args, result.stderr)
        assert "Traceback" not in result.stderr

    assert "HAT conversion: 3 tasks" in conv.stdout and f"saved to {converted}" in conv.stdout
    fresh = hatconvert.load(converted)
    assert torch.equal(fresh.model.conv1.weight, source.conv1.weight)
    assert fresh.trained_tasks() == [] and fresh.config["mask_init"] == "dense"

    assert "tasks trained: 0, 1 (classes per task: 3, 5, 4)" in insp.stdout
    assert f"capacity: {100 * net.capacity():.1f}%" in insp.stdout
    table = insp.stdout.split("\n\n", 1)[1]
    assert "task 0" in table and "task 1" in table and "task 2" not in table
    for layer, usage in net.mask_usage().items():
        assert any(line.startswith(layer + " ") and f"{100 * usage[1]:.1f}%" in line
                   for line in table.splitlines()), layer
    with Image.open(plot) as image:
        assert image.format == "PNG" and image.height > 10 * len(net.layout.gated)

    assert "task 1 exported" in exp.stdout
    model = timm.create_model("resnet18", num_classes=CLASSES[1]).eval()
    model.load_state_dict(load_file(str(exported)))
    with torch.no_grad():
        assert (model(x) - net(x, 1)).abs().max().item() <= 1e-5

    assert "forgot task 0" in forg.stdout
    left = hatconvert.load(forgotten)
    assert left.trained_tasks() == [1]
    with torch.no_grad():
        assert torch.equal(left(x, 1), net(x, 1))
    assert left.capacity() > net.capacity()


def test_export_prune_writes_a_program_that_runs_without_hatconvert(trained, tmp_path):
    net, x, path = trained
    program = tmp_path / "task1.pt2"
    (result,) = run_all(["export", path, "--task", 1, "-o", program, "--prune"])
    assert result.returncode == 0, result.stderr
    assert "a torch.export program of the pruned task" in result.stdout
    with torch.no_grad():
        assert torch.allclose(torch.export.load(program).module()(x), net(x, 1), atol=1e-5)
    (again,) = run_all(["export", path, "--task", 1, "-o", program, "--prune"])
    assert again.returncode != 0 and "exists" in again.stderr  # never overwritten silently


def check_error(args, code, out, err, expected):
    lines = err.strip().splitlines()
    assert code != 0, args
    assert len(lines) == 1 and lines[0].startswith("hatconvert: error: "), (args, lines)
    assert expected in lines[0] and "Traceback" not in err, (args, lines[0])
    assert out == "", (args, out)


def test_user_errors_are_one_line_without_a_traceback(trained, tmp_path, capsys):
    _, _, path = trained
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint\n")
    custom = tmp_path / "custom.safetensors"
    hatconvert.save(hatconvert.convert(ResidualConcatNet(), num_tasks=2), custom)
    existing = tmp_path / "existing.safetensors"
    existing.write_bytes(b"keep me")
    in_subprocesses = {  # one failure of each command as a user meets it
        ("inspect", text): "notes.txt' is not a safetensors file",
        ("export", path, "--task", 2, "-o", tmp_path / "t2.safetensors"): "task 2 is not trained",
        ("forget", path, "--task", 2, "-o", existing, "--force"): "task 2 is not trained",
        ("convert", "resnet19", "--num-tasks", 2): "timm has no model named 'resnet19'",
    }
    in_process = {
        ("inspect", tmp_path / "missing.safetensors"): "missing.safetensors' does not exist",
        ("export", path, "--task", 7, "-o", existing, "--force"): "task_id 7 is out of range",
        ("export", custom, "--task", 0, "-o", existing, "--force"): "holds a custom model",
        ("convert", "resnet18", "--num-tasks", 2, "--weights", tmp_path / "none.safetensors"):
            "none.safetensors' does not exist",
        ("convert", "resnet18", "--num-tasks", 0): "num_tasks must be an int >= 1",
        ("convert", "resnet18", "--num-tasks", 2, "-o", tmp_path / "no-dir" / "x.safetensors"):
            "no-dir' does not exist",
    }
    for args, result in zip(in_subprocesses, run_all(*[list(a) for a in in_subprocesses])):
        check_error(args, result.returncode, result.stdout, result.stderr, in_subprocesses[args])
    for args, expected in in_process.items():
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        check_error(args, code, captured.out, captured.err, expected)
    assert existing.read_bytes() == b"keep me"
    assert not (tmp_path / "t2.safetensors").exists()
    assert sorted(os.listdir(tmp_path)) == ["custom.safetensors", "existing.safetensors",
                                            "notes.txt"]  # no temporary files left behind


def run_in_process(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_no_command_writes_over_an_existing_file_or_its_own_input(trained, tmp_path, capsys):
    _, _, path = trained
    before = path.read_bytes()
    existing = tmp_path / "existing.safetensors"
    existing.write_bytes(b"keep me")
    link = tmp_path / "link.safetensors"
    link.symlink_to(path)
    refused = {
        ("convert", "resnet18", "--num-tasks", 2, "-o", existing):
            "-o '{existing}' already exists: pass --force to replace it",
        ("export", path, "--task", 0, "-o", existing): "already exists: pass --force",
        ("forget", path, "--task", 0, "-o", existing): "already exists: pass --force",
        ("inspect", path, "--plot", existing): "--plot '{existing}' already exists",
        ("export", path, "--task", 0, "-o", path): "-o '{path}' is the input file",
        ("export", path, "--task", 0, "-o", path, "--force"): "is the input file",
        ("forget", path, "--task", 0, "-o", link, "--force"): "-o '{link}' is the input file",
        ("inspect", path, "--plot", path, "--force"): "--plot '{path}' is the input file",
        ("convert", "resnet18", "--num-tasks", 2, "--weights", existing, "-o", existing,
         "--force"): "is the input file '{existing}'",
        ("convert", "resnet18", "--num-tasks", 2, "-o", ""): "-o is empty: name the file",
        ("forget", path, "--task", 0, "-o", ""): "-o is empty",
        ("inspect", path, "--plot", ""): "--plot is empty",
    }
    for args, expected in refused.items():
        code, out, err = run_in_process(capsys, *args)
        check_error(args, code, out, err, expected.format(existing=existing, path=path,
                                                          link=link))
    assert path.read_bytes() == before and existing.read_bytes() == b"keep me"
    code, out, err = run_in_process(capsys, "export", path, "--task", 0, "-o", existing,
                                    "--force")
    assert code == 0 and err == "" and "task 0 exported" in out
    assert len(load_file(str(existing))) > 0
    assert sorted(os.listdir(tmp_path)) == ["existing.safetensors", "link.safetensors"]


def test_inspect_and_forget_a_half_precision_checkpoint(trained, tmp_path, capsys):
    net, x, path = trained
    half = hatconvert.load(path).half()  # its example input was recorded in float32
    hatconvert.save(half, tmp_path / "half.safetensors")
    code, out, err = run_in_process(capsys, "inspect", tmp_path / "half.safetensors")
    assert code == 0 and err == "", err
    assert f"capacity: {100 * net.capacity():.1f}%" in out
    code, out, err = run_in_process(capsys, "forget", tmp_path / "half.safetensors", "--task", 0,
                                    "-o", tmp_path / "forgot.safetensors")
    assert code == 0 and err == "" and "forgot task 0" in out
    left = hatconvert.load(tmp_path / "forgot.safetensors")
    assert left.trained_tasks() == [1] and left.model.conv1.weight.dtype == torch.float16
    with torch.no_grad():
        assert torch.equal(left(x.half(), 1), half(x.half(), 1))
