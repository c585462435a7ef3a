"""Exceptions raised by hatconvert; each message names the thing at fault."""

from __future__ import annotations


class HATError(Exception):
    """Base class of every error hatconvert raises on purpose."""


class ConversionError(HATError):
    """The model cannot be converted; the message names the module or function at fault."""


class TaskError(HATError, ValueError):
    """A task id or task sequence is invalid (out of range, out of order)."""


class CheckpointError(HATError):
    """A checkpoint file cannot be written or read; the message names the file and the fault."""


class ExportError(HATError):
    """A task cannot be exported as plain weights; the message names the layer at fault."""
