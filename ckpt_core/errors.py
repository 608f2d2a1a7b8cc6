"""Every error ckptflow raises on an expected failure: each names the file and what to do.

The CLI prints these as one line and exits non-zero; anything else is a bug and keeps its
traceback. Whether a failure is worth retrying is decided by `ckpt_core.io.retry`, not here.
"""

from __future__ import annotations

__all__ = [
    "AdapterError",
    "CastOverflowError",
    "CkptError",
    "ConfigError",
    "FormatError",
    "KeyMismatchError",
    "LockLostError",
    "PublishError",
    "SourceChangedError",
    "StorageFullError",
    "StorageRefusedError",
    "StorageUnavailableError",
    "TrainCommandError",
    "UnknownTensorError",
    "UnsafeFileError",
    "UsageError",
    "VerifyError",
    "clip",
]


class CkptError(Exception):
    """Base of every expected failure."""


class UsageError(CkptError):
    """An option value ckptflow cannot use (a size, a dtype, an output format)."""


class CastOverflowError(UsageError):
    """A finite source value becomes inf in the chosen --dtype (fp32 above 65504 to fp16)."""


class FormatError(CkptError):
    """The input is not a checkpoint ckptflow can read, or is malformed."""


class AdapterError(FormatError):
    """A PEFT adapter ckptflow will not fuse or keep (not LoRA, DoRA, a base-changing init...)."""


class UnsafeFileError(FormatError):
    """A file asks to run code (a pickle global outside the allow-list)."""


class UnknownTensorError(CkptError, KeyError):
    """`Reader.read` of a name the reader's index does not hold (every reader raises this)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class ConfigError(CkptError):
    """A model config (config.json, --base) is missing or is not one transformers can build."""


class KeyMismatchError(CkptError):
    """Tensor names do not match what the model or the plan expects."""


class VerifyError(CkptError):
    """Written output differs from its source."""


class SourceChangedError(CkptError):
    """The source checkpoint changed while it was being converted."""


class PublishError(CkptError):
    """The destination cannot be written as asked (exists, differs, is the source)."""


class DestinationBusyError(PublishError):
    """Another live run holds the destination: a later try finds it done or free."""


class LockLostError(PublishError):
    """This run's destination lock was taken over (judged stale) or lost: it stops writing and
    cleans up nothing, since the destination may now be another run's."""


class StorageUnavailableError(CkptError):
    """Transient storage errors outlasted the retries. The work so far is kept for a rerun."""


class StorageRefusedError(CkptError):
    """A permanent storage failure (missing bucket or file, permission denied)."""


class StorageFullError(StorageRefusedError):
    """The destination ran out of space (or hit a file size limit). Not retried, but the
    finished shards are kept: a rerun after freeing space resumes."""


class TrainCommandError(CkptError):
    """The user's training command failed or wrote no rank files."""


def clip(names: list[str] | set[str], most: int = 10) -> str:
    """A sorted, bounded listing of names for an error message."""
    ordered = sorted(names)
    shown = ", ".join(ordered[:most])
    return shown + (f" ... (+{len(ordered) - most} more)" if len(ordered) > most else "")
