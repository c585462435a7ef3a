"""The code stays readable: no class over 250 lines, no function over 60 (tools/check_sizes.py)."""

from __future__ import annotations

import importlib.util
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent


def load_checker():
    spec = importlib.util.spec_from_file_location("check_sizes", ROOT / "tools" / "check_sizes.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_no_class_or_function_in_the_package_is_over_its_limit():
    checker = load_checker()
    problems = [line for f in sorted((ROOT / "hatconvert").rglob("*.py"))
                for line in checker.oversized(f, 250, 60)]
    assert problems == []


def test_the_checker_finds_a_long_function(tmp_path):
    checker = load_checker()
    long = tmp_path / "long.py"
    long.write_text("def f():\n" + "    x = 1\n" * 70)
    found = checker.oversized(long.resolve(), 250, 60)
    assert len(found) == 1 and "function f (71 lines" in found[0]
