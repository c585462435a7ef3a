"""Fail when a class in hatconvert/ is over 250 lines or a function over 60 (CI runs this).

Lines are counted from the ``def``/``class`` line to the last line of the body, docstrings and
blank lines included: what a reader has to hold in mind at once.

    python tools/check_sizes.py [--classes 250] [--functions 60] [PATH ...]
"""

from __future__ import annotations

import argparse
import ast
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def oversized(path: pathlib.Path, max_class: int, max_function: int) -> list[str]:
    """``file:line kind name (N lines)`` for each definition over its limit."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            limit, kind = max_class, "class"
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            limit, kind = max_function, "function"
        else:
            continue
        start = min([node.lineno] + [d.lineno for d in node.decorator_list])
        length = node.end_lineno - start + 1
        if length > limit:
            found.append(f"{_shown(path)}:{node.lineno} {kind} {node.name} "
                         f"({length} lines, limit {limit})")
    return found


def _shown(path: pathlib.Path) -> str:
    try:
        return str(path.relative_to(ROOT))
    except ValueError:
        return str(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=250)
    parser.add_argument("--functions", type=int, default=60)
    parser.add_argument("paths", nargs="*", default=[str(ROOT / "hatconvert")])
    args = parser.parse_args(argv)
    files = sorted(f for p in args.paths for f in (
        pathlib.Path(p).rglob("*.py") if pathlib.Path(p).is_dir() else [pathlib.Path(p)]))
    problems = [line for f in files for line in oversized(f.resolve(), args.classes,
                                                           args.functions)]
    for line in problems:
        print(line)
    print(f"{len(files)} files checked: {len(problems)} definitions over the limits")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
