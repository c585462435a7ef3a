"""benchmarks/continual.py end to end on IDX files the test writes (no download, no data)."""

from __future__ import annotations

import gzip
import json
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import continual  # noqa: E402


def write_idx(path, array: np.ndarray, compress: bool) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(n).to_bytes(4, "big")
                                                       for n in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if compress:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def fake_dataset(root, name: str, compress: bool, per_class: int = 12) -> None:
    """Ten classes of 28x28 images, each class a bright square at its own place."""
    raw = root / name / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix in ("train", "t10k"):
        labels = np.repeat(np.arange(10), per_class)
        images = rng.integers(0, 60, (len(labels), 28, 28))
        for i, c in enumerate(labels):
            images[i, 2 * c:2 * c + 8, 2 * c:2 * c + 8] = 255
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images, compress)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels, compress)


def test_read_idx_reads_gzipped_and_plain_files(tmp_path):
    fake_dataset(tmp_path, "MNIST", compress=False)
    fake_dataset(tmp_path, "FashionMNIST", compress=True)
    for name in ("MNIST", "FashionMNIST"):
        x, y = continual.load_dataset(tmp_path, name, train=True)
        assert x.shape == (120, 1, 28, 28) and float(x.max()) == 1.0
        assert sorted(set(y.tolist())) == list(range(10))
    with pytest.raises(FileNotFoundError, match="t10k-images-idx3-ubyte"):
        continual.load_dataset(tmp_path / "nowhere", "MNIST", train=False)


def test_split_benchmark_records_a_frozen_diagonal_and_the_baselines(tmp_path, capsys):
    fake_dataset(tmp_path, "MNIST", compress=False)
    out = tmp_path / "results.json"
    continual.main(["--data-root", str(tmp_path), "--benchmark", "split-mnist", "--arch", "mlp",
                    "--epochs", "2", "--batch-size", "8", "--out", str(out)])
    records = json.loads(out.read_text())
    assert [r["method"] for r in records] == ["hat", "finetune", "separate"]
    hat = records[0]
    matrix = hat["matrix"]
    for j in range(5):  # every column stays what it was when its task ended
        assert all(matrix[i][j] == matrix[j][j] for i in range(j, 5))
    assert hat["bwt"] == 0.0 and len(hat["capacity"]) == 5
    assert all(0.0 <= c <= 1.0 for c in hat["capacity"])
    assert hat["capacity"] == sorted(hat["capacity"], reverse=True)
    assert "ACC" in capsys.readouterr().out
