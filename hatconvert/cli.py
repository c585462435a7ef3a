"""The ``hatconvert`` command: convert timm models by name (more commands build on this)."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from .errors import HATError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hatconvert", description="Turn PyTorch models into HAT continual learners.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    conv = commands.add_parser("convert", help="convert a timm model by name and print the report",
                               description="Convert a timm model by name and print the report.")
    conv.add_argument("model", help="timm model name, e.g. resnet18")
    conv.add_argument("--num-tasks", type=int, required=True, help="number of tasks")
    conv.add_argument("--num-classes", type=int, nargs="+", default=None,
                      help="classes per task: one number for all tasks, or one per task")
    conv.add_argument("--weights", default=None, help="local file of pretrained weights")
    conv.add_argument("--mask-init", default="normal", choices=["normal", "uniform", "dense"],
                      help="task embedding initialisation (default: normal)")
    conv.add_argument("--loose", default="task", choices=["task", "freeze"],
                      help="policy for loose parameters and leaves with hidden weights")
    return parser


def run_convert(args: argparse.Namespace) -> int:
    from .convert import convert
    classes = args.num_classes
    if classes is not None and len(classes) == 1:
        classes = classes[0]
    net = convert(args.model, num_tasks=args.num_tasks, num_classes=classes,
                  mask_init=args.mask_init, loose=args.loose, weights=args.weights)
    print(net.report())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return {"convert": run_convert}[args.command](args)
    except HATError as exc:
        print(f"hatconvert: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
