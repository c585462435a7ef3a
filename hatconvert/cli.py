"""The ``hatconvert`` command: convert, inspect, export and forget; the work lives elsewhere."""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING, Sequence

from .errors import CheckpointError, HATError, one_line

if TYPE_CHECKING:
    from .network import HATNetwork
    from .options import ConversionOptions

__all__ = ['build_parser', 'add_conversion_options', 'conversion_options', 'add_task_command',
           'add_force', 'check_output', 'progress', 'load_checkpoint', 'run_convert',
           'run_inspect', 'run_export', 'run_forget', 'main']


def build_parser() -> argparse.ArgumentParser:
    """The ``hatconvert`` argument parser: one subcommand per job."""
    parser = argparse.ArgumentParser(
        prog="hatconvert", description="Turn PyTorch models into HAT continual learners.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    conv = commands.add_parser("convert", help="convert a timm model by name and print the report",
                               description="Convert a timm model by name and print the report.")
    conv.add_argument("model", help="timm model name, e.g. resnet18")
    add_conversion_options(conv)
    conv.add_argument("--weights", default=None, help="local file of pretrained weights")
    conv.add_argument("-o", "--output", default=None, metavar="FILE",
                      help="save the converted network to this .safetensors file")
    add_force(conv)

    insp = commands.add_parser(
        "inspect", help="show the tasks trained, mask usage per layer and task, and capacity",
        description="Show a checkpoint's tasks, the share of each gated layer's units every "
                    "trained task uses, and the share of weights still free to train.")
    insp.add_argument("checkpoint", help="a .safetensors file written by hatconvert")
    insp.add_argument("--plot", default=None, metavar="FILE.png",
                      help="also write a heatmap of usage per layer and task as a PNG")
    add_force(insp)

    exp = commands.add_parser(
        "export", help="write one task as plain weights of the original model",
        description="Write one task as a plain state dict of the original architecture: the "
                    "task's masks folded into the weights, its own norms and head picked. "
                    "Load it with model.load_state_dict(safetensors.torch.load_file(FILE)).")
    add_task_command(exp, "the task to export", "the .safetensors file to write")
    exp.add_argument("--allow-untrained", action="store_true",
                     help="export a task that was never trained (its initial masks)")
    exp.add_argument("--prune", action="store_true",
                     help="write a torch.export program (.pt2) without the units the task "
                          "leaves closed; it runs with plain PyTorch: "
                          "torch.export.load(FILE).module()(x); a FILE ending in .onnx "
                          "gets an ONNX model (needs the onnx extra)")

    forg = commands.add_parser(
        "forget", help="release the units only one task used and save the result",
        description="Forget one trained task: the units only it used become free for later "
                    "tasks; every other task computes exactly what it did.")
    add_task_command(forg, "the task to forget", "where to save the network without the task "
                     "(not the input: write elsewhere, then rename)")
    return parser


def add_conversion_options(parser: argparse.ArgumentParser) -> None:
    """The conversion options, with the choices, defaults and help of ``ConversionOptions``."""
    from .options import ConversionOptions as Options
    parser.add_argument("--num-tasks", type=int, required=True, help=Options.help("num_tasks"))
    parser.add_argument("--num-classes", type=int, nargs="+", default=None,
                        help=Options.help("num_classes"))
    for name, choices in Options.CHOICES.items():
        parser.add_argument(f"--{name.replace('_', '-')}", default=Options.default(name),
                            choices=choices,
                            help=f"{Options.help(name)} (default: {Options.default(name)})")
    for name in ("include", "exclude"):
        parser.add_argument(f"--{name}", nargs="+", default=None, metavar="PATTERN",
                            help=Options.help(name))
    parser.add_argument("--head", nargs="+", default=None, metavar="PATH",
                        help="module path of the classifier, or several (default: found)")
    parser.add_argument("--no-head", action="store_true", help="no task-indexed head")
    parser.add_argument("--auto-leaves", action="store_true", help=Options.help("auto_leaves"))


def conversion_options(args: argparse.Namespace) -> "ConversionOptions":
    """The ``ConversionOptions`` the ``convert`` command's arguments ask for."""
    from .options import ConversionOptions
    classes = args.num_classes
    head = False if args.no_head else args.head[0] if args.head and len(args.head) == 1 \
        else args.head
    return ConversionOptions(
        num_tasks=args.num_tasks, num_classes=classes[0] if classes and len(classes) == 1
        else classes, mask_init=args.mask_init, head=head, loose=args.loose,
        include=args.include, exclude=args.exclude, leaves=args.leaves,
        auto_leaves=args.auto_leaves, embeddings=args.embeddings)


def add_task_command(parser: argparse.ArgumentParser, task_help: str, output_help: str) -> None:
    """The arguments ``export`` and ``forget`` share: a checkpoint, a task, an output."""
    parser.add_argument("checkpoint", help="a .safetensors file written by hatconvert")
    parser.add_argument("--task", type=int, required=True, help=task_help)
    parser.add_argument("-o", "--output", required=True, metavar="FILE", help=output_help)
    add_force(parser)


def add_force(parser: argparse.ArgumentParser) -> None:
    """``--force`` on every command that writes: replacing a file must be asked for."""
    parser.add_argument("--force", action="store_true",
                        help="replace the output file if it exists (never the input file)")


def check_output(path: str | None, option: str, force: bool, inputs: Sequence[str | None]) -> None:
    """Refuse an output that would destroy a file, before any slow work.

    An existing file is kept unless ``--force``; an input file is never written over, even with
    ``--force``: a failed or wrong result would lose the only copy.
    """
    from .checkpoint import check_target
    if path is None:
        return
    if not path:
        raise CheckpointError(f"{option} is empty: name the file to write")
    for source in inputs:
        if source and os.path.exists(source) and os.path.exists(path) and \
                os.path.samefile(source, path):
            raise CheckpointError(f"{option} {path!r} is the input file {source!r}: write "
                                  "elsewhere (and rename afterwards if you mean to replace it)")
    check_target(path)
    if os.path.exists(path) and not force:
        raise CheckpointError(f"{option} {path!r} already exists: pass --force to replace it")


def progress(total: int, desc: str):
    """A tqdm bar on stderr when it is a terminal (long steps: building, loading, writing)."""
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, file=sys.stderr, leave=False,
                disable=not sys.stderr.isatty(), bar_format="{desc}: {n}/{total}{postfix}")


def load_checkpoint(path: str, bar) -> HATNetwork:
    """``load(path)``, advancing the progress bar."""
    from .checkpoint import load
    bar.set_postfix_str(f"loading {os.path.basename(path)}")
    net = load(path)
    bar.update(1)
    return net


def run_convert(args: argparse.Namespace) -> int:
    """``hatconvert convert``: convert a timm model, print the report, save if asked."""
    from .convert import convert_with_options
    check_output(args.output, "-o", args.force, [args.weights])
    options = conversion_options(args)
    with progress(1 if args.output is None else 2, "convert") as bar:  # closed before errors
        bar.set_postfix_str(f"converting {args.model}")
        net = convert_with_options(args.model, options, weights=args.weights)
        bar.update(1)
        if args.output is not None:
            from .checkpoint import save
            bar.set_postfix_str(f"writing {args.output}")
            save(net, args.output)
            bar.update(1)
    print(net.report())
    if args.output is not None:
        print(f"saved to {args.output}")
    return 0


def run_inspect(args: argparse.Namespace) -> int:
    """``hatconvert inspect``: tasks, usage per layer and task, capacity; a heatmap if asked."""
    from .checkpoint import describe
    from .usage import free_per_layer, overall_capacity, usage_heatmap, usage_table
    check_output(args.plot, "--plot", args.force, [args.checkpoint])
    info = describe(args.checkpoint)
    with progress(2 if args.plot is None else 3, "inspect") as bar:
        net = load_checkpoint(args.checkpoint, bar)
        bar.set_postfix_str("propagating masks")
        free = free_per_layer(net)
        bar.update(1)
        if args.plot is not None:
            bar.set_postfix_str(f"writing {args.plot}")
            usage_heatmap(net, args.plot, free)
            bar.update(1)
    source = info["source"]
    what = f"timm {source.get('name')}" if source.get("kind") == "timm" else \
        f"custom {source.get('class', 'model')}"
    trained = net.trained_tasks()
    classes = info["classes_per_task"]
    print(f"{args.checkpoint}: {what}, {net.num_tasks} tasks, written by hatconvert "
          f"{info['hatconvert_version']}")
    print(f"tasks trained: {', '.join(map(str, trained)) if trained else 'none'}"
          + (f" (classes per task: {', '.join(map(str, classes))})" if classes else ""))
    if free is None:
        print("capacity: n/a (the checkpoint holds no example input: run one forward and save)")
    else:
        print(f"capacity: {100 * overall_capacity(net, free):.1f}% of gated weights and "
              "biases free")
    print()
    print(usage_table(net, free))
    if args.plot is not None:
        print(f"\nheatmap written to {args.plot}")
    return 0


def run_export(args: argparse.Namespace) -> int:
    """``hatconvert export``: one task as plain weights of the original model."""
    from .export import export
    check_output(args.output, "-o", args.force, [args.checkpoint])
    with progress(2, "export") as bar:
        net = load_checkpoint(args.checkpoint, bar)
        bar.set_postfix_str(f"writing {args.output}")
        state = export(net, args.task, args.output, allow_untrained=args.allow_untrained,
                       prune=args.prune)
        bar.update(1)
    if args.prune:
        kept = sum(p.numel() for p in state.parameters())
        from .pruned import is_onnx
        kind = "an ONNX model" if is_onnx(args.output) else "a torch.export program"
        print(f"task {args.task} exported to {args.output}: {kind} of the pruned task, "
              f"{kept} parameters")
        return 0
    head = net.layout.heads[0] if net.layout.heads else None
    classes = f", {state[head + '.weight'].shape[0]} classes" if head and \
        f"{head}.weight" in state else ""
    print(f"task {args.task} exported to {args.output}: {len(state)} tensors of the original "
          f"model{classes}")
    return 0


def run_forget(args: argparse.Namespace) -> int:
    """``hatconvert forget``: release what only one task used and save the result elsewhere."""
    from .checkpoint import save
    check_output(args.output, "-o", args.force, [args.checkpoint])
    with progress(2, "forget") as bar:
        net = load_checkpoint(args.checkpoint, bar)
        before = net.capacity()
        gained = net.forget(args.task)
        bar.set_postfix_str(f"writing {args.output}")
        save(net, args.output)
        bar.update(1)
    print(f"forgot task {args.task}: capacity {100 * before:.1f}% -> "
          f"{100 * (before + gained):.1f}% (+{100 * gained:.1f} points); saved to {args.output}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; user errors print one line and return 2."""
    args = build_parser().parse_args(argv)
    try:
        commands = {"convert": run_convert, "inspect": run_inspect, "export": run_export,
                    "forget": run_forget}
        return commands[args.command](args)
    except HATError as exc:
        print(f"hatconvert: error: {one_line(exc)}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # stdout closed early (| head): not an error of ours
        sys.stdout = open(os.devnull, "w")
        return 0
    except OSError as exc:  # a file the user named cannot be read or written
        where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        print(f"hatconvert: error: {where}{one_line(exc.strerror or exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hatconvert: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
