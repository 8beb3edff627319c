"""Errors the user can fix, as opposed to bugs.

The command-line tools (extractor.py, matcher.py, evaluate.py) print a :class:`UserError` in one
line and exit with status 1; any other exception (a ValueError inside numpy included) keeps its
traceback. Both kinds subclass ValueError, so library callers that catch ValueError still do.
Files that cannot be used have their own types (FeatureFileError, PcaError, CodebookError,
CheckpointError, EvalError, InputError).
"""
from __future__ import annotations


class UserError(ValueError):
    """A problem with what the user asked for or gave; the message says what and why."""


class OptionError(UserError):
    """An option value, or a combination of options, that cannot work (a negative scale, an
    unknown index kind, --save_attention without scale 1.0)."""


class InputMismatch(UserError):
    """Inputs that do not fit together or are too few: descriptors of another dimension, features
    without global descriptors, a ranking of the wrong shape, fewer descriptors than visual
    words."""


class DownloadError(UserError):
    """A download or an unpacking that did not complete (cut off, HTTP error, wrong hash, disk
    full, a damaged archive or manifest); the message names the file and what to do, and no
    partial file is left where a complete one is expected."""
