"""Errors with documented exit codes. Every user-facing failure is one of these.

The CLI prints ``error: <message>`` on one line and exits with ``exit_code``.
"""

from __future__ import annotations


class TveditError(Exception):
    """Base class; exit code 1 is reserved for unexpected internal errors."""

    exit_code = 1


class UsageError(TveditError):
    """Invalid option values or combinations, also in a recipe, and NaN/Inf given as a number
    (checked before any work starts)."""

    exit_code = 2


class InputError(TveditError):
    """An input file is missing, unreadable, not safetensors, truncated, or its header or manifest
    does not follow the format (a field of the wrong type, a bad sparse record)."""

    exit_code = 3


class MismatchError(TveditError):
    """Inputs do not fit together: keys, shapes, bases, regimes, model families."""

    exit_code = 4


class NumericError(TveditError):
    """A result contains NaN or Inf (allowed only with --allow-nonfinite)."""

    exit_code = 5


class OutputError(TveditError):
    """The output exists (without --force), would overwrite one of the inputs, its directory is
    missing, or it cannot be written (permission, read-only filesystem, full disk)."""

    exit_code = 6


class GateError(TveditError):
    """An accuracy gate failed (evaluate --min-accuracy)."""

    exit_code = 7


class DataError(TveditError):
    """A dataset is empty, unreadable, or unusable (e.g. a single class)."""

    exit_code = 8


# Standard output was closed by the next command of a pipeline (it failed or exited without reading):
# the intermediates written for it are removed. 141 = 128 + SIGPIPE, what a shell reports for a
# process killed by a closed pipe.
PIPE_CLOSED = 141

EXIT_CODES = {
    0: "success",
    1: "internal error (a bug: please report it)",
    2: "usage error: bad option value or combination (also in a recipe; NaN/Inf as a number)",
    3: "input error: missing, unreadable, truncated or non-safetensors file, or a malformed header or manifest",
    4: "mismatch: keys, shapes, bases, regimes or model families do not fit together",
    5: "numeric error: NaN or Inf in a result",
    6: "output error: output exists (use --force), equals an input, its directory is missing, or it cannot be written (full disk)",
    7: "gate failed: an accuracy fell below its --min-accuracy threshold (or a perplexity rose above its --max-perplexity)",
    8: "data error: dataset empty, unreadable or unusable",
    130: "interrupted by SIGINT: the unfinished output was removed",
    141: "standard output closed by the next command (SIGPIPE convention): the intermediates written for it were removed",
    143: "interrupted by SIGTERM: the unfinished output was removed",
}
