"""Errors ckptflow raises on expected failures: each names the file and what to do.

The CLI prints these as one line and exits non-zero; anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations


class CkptError(Exception):
    """Base of every expected failure."""


class FormatError(CkptError):
    """The input is not a checkpoint ckptflow can read, or is malformed."""


class UnsafeFileError(FormatError):
    """A file asks to run code (a pickle global outside the allow-list)."""


class KeyMismatchError(CkptError):
    """Tensor names do not match what the model or the plan expects."""


class VerifyError(CkptError):
    """Written output differs from its source."""


class PublishError(CkptError):
    """The destination cannot be written as asked (exists, differs, is the source)."""


def clip(names: list[str] | set[str], most: int = 10) -> str:
    """A sorted, bounded listing of names for an error message."""
    ordered = sorted(names)
    shown = ", ".join(ordered[:most])
    return shown + (f" ... (+{len(ordered) - most} more)" if len(ordered) > most else "")
