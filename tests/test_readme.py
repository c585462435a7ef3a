"""The README's Python examples run as written (in order, in one namespace)."""

from __future__ import annotations

import importlib.util
import os
import re

README = os.path.join(os.path.dirname(__file__), "..", "README.md")


def test_readme_python_examples_run(tmp_path, monkeypatch):
    text = open(README, encoding="utf-8").read()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= 3
    monkeypatch.chdir(tmp_path)  # examples that write files write them here
    namespace: dict = {}
    for i, block in enumerate(blocks):
        if any(re.search(rf"^(import [^\n]*\b|from ){extra}\b", block, flags=re.M)
               and importlib.util.find_spec(extra) is None
               for extra in ("transformers", "lightning", "accelerate")):
            continue  # the example needs an optional extra
        exec(compile(block, f"README.md python block {i}", "exec"), namespace)
