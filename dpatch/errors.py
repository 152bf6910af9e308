"""Errors raised by dpatch: each carries a message a user can act on.

The command line maps each class to an exit code (``exit_code``) and prints only the
message; the library never prints.
"""

from __future__ import annotations


def first_line(what: BaseException | str, limit: int | None = 200, *, typed: bool = False) -> str:
    """The first non-blank line of a message (at most ``limit`` characters): how an error is
    quoted in a one-line message, and how the command line prints one.

    Args:
        what: an exception (its message; its type's name when it has none) or a text.
        limit: the most characters kept (None: all).
        typed: prefix the exception's type (``RuntimeError: ...``), except for dpatch's
            own errors, whose messages are worded already.
    """
    text = str(what).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if isinstance(what, BaseException):
        line = lines[0] if lines else type(what).__name__
        if typed and lines and not isinstance(what, DPatchError):
            line = f"{type(what).__name__}: {line}"
    else:
        line = lines[0] if lines else "(no message)"
    return line if limit is None else line[:limit]


class DPatchError(Exception):
    """Base class: a failed operation whose message names the bad value and a fix."""

    exit_code = 1


class InvalidValueError(DPatchError, ValueError):
    """An argument is out of range or of the wrong kind (rates, schedules, modes)."""


class ModelNotFoundError(DPatchError, LookupError):
    """A model spec names no model that timm, torchvision or Python can provide."""


class DownloadError(DPatchError):
    """Pretrained weights or a hub config could not be fetched (offline, no access)."""


class WeightsError(DPatchError):
    """A weights file is missing, unreadable, corrupt, unsafe or of another architecture."""


class OutputError(DPatchError):
    """An output path exists (without ``force``), or its folder is missing or read-only."""


class ManifestError(DPatchError):
    """A file's dpatch manifest is missing, malformed or of an unknown format version."""


class ProbeError(DPatchError):
    """The model could not be run on any input dpatch tried (or was given), so its residual
    branches cannot be found; the message lists what was tried and how to give an input.

    Attributes:
        failure: the first failure, one line (``RuntimeError: shape ... is invalid``).
    """

    def __init__(self, message: str, failure: str = "") -> None:
        super().__init__(message)
        self.failure = failure


class NoResidualSitesError(DPatchError):
    """The model has no residual branch to put stochastic depth on."""

    exit_code = 3


class UnanalysedError(DPatchError):
    """The model ran, has no residual site dpatch could find, and some of its blocks could
    not be analysed: "no residual branch" would be a guess. The message names the blocks,
    each with why, and what to try."""


class NoSlotsError(NoResidualSitesError):
    """``retune`` was asked to change rates, but the model has no DropPath slot (``inject``
    adds them)."""


class TraceError(DPatchError):
    """A block's forward could not be traced or rewritten (reported as skipped, not raised)."""


class DataError(DPatchError):
    """Data for a measurement is missing, empty or malformed (a folder without images, a
    tensor file without ``inputs``)."""


class UnsupportedSiteError(DPatchError):
    """A site cannot be pruned or folded; the message names the site and why."""


class ModelRunError(DPatchError):
    """The model could not be run on the inputs given (or inferred) for it: ``verify``
    runs real forward passes."""


class RankMismatchError(DPatchError):
    """Distributed ranks would take different batch-mode decisions (different sites,
    settings, seeds or draw counts), or a rank never joined the first-step comparison; the
    message names the rank and the site."""


class ReplayError(DPatchError):
    """Activation checkpointing recomputed a batch-mode site whose decision could not be
    found again (checkpointing without ``preserve_rng_state``): the recomputed branch
    would not be the one the forward ran."""
