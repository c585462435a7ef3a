"""Exceptions raised by hatconvert; each message names the thing at fault."""

from __future__ import annotations

import re

__all__ = ['HATError', 'ConversionError', 'OptionError', 'TaskError', 'CheckpointError',
           'ExportError', 'InputError', 'MixedBatchError', 'DistributedError', 'one_line']


class HATError(Exception):
    """Base class of every error hatconvert raises on purpose."""


class ConversionError(HATError):
    """The model cannot be converted; the message names the module or function at fault."""


class OptionError(ConversionError, ValueError):
    """An option has a value hatconvert does not accept (at conversion, ``begin_task`` or in a
    schedule); the message names the option and its choices."""


class TaskError(HATError, ValueError):
    """A task id or task sequence is invalid (out of range, out of order)."""


class InputError(HATError, TypeError):
    """A call gives an input the converted network does not take, or one that tracing fixed at
    another value; the message names the input."""


class CheckpointError(HATError):
    """A checkpoint file cannot be written or read; the message names the file and the fault."""


class ExportError(HATError):
    """A task cannot be exported as plain weights; the message names the layer at fault."""


class MixedBatchError(HATError, ValueError):
    """A batch of several tasks (``net(x, task_id=ids)``) cannot run in one pass for this model;
    the message names the input, parameter or layer output at fault. One task per call works."""


class DistributedError(HATError, RuntimeError):
    """A wrapper for several processes (``DistributedDataParallel``, FSDP) is set up in a way
    under which ranks could drift apart or a trained task could change; the message names the
    wrapper and the option to change."""


def one_line(message: object, keep: int = 5) -> str:
    """``message`` (often torch's or timm's) on one line, each list of quoted names cut to ``keep``.

    ``load_state_dict`` errors list every missing key, kilobytes of them; a user needs the first
    few and the count. Lines are joined with "; " (a space after a colon): the CLI prints one
    line.
    """
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]

    def cut(match: re.Match) -> str:
        names = re.findall(r'"[^"]*"|\'[^\']*\'', match.group(0))
        if len(names) <= keep:
            return match.group(0)
        return f"{', '.join(names[:keep])}, ... ({len(names)} in all)"
    quoted = r'(?:"[^"]*"|\'[^\']*\')'
    lines = [re.sub(rf"{quoted}(?:, {quoted})+", cut, line) for line in lines]
    if len(lines) > keep:
        lines = lines[:keep] + [f"... ({len(lines) - keep} more lines)"]
    return "".join(line + (" " if line.endswith(":") else "; ") for line in lines[:-1]) + \
        (lines[-1] if lines else "")
