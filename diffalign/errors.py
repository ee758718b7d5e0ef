"""Errors a user can fix, by kind. The bottom layer: imports nothing from diffalign.

``diffalign`` commands print a ``DiffalignError`` as one line and exit with its ``exit_code`` (2 for a config,
data or model problem, 3 for a run that stopped itself); anything else is a bug and shows its traceback
(``--debug`` or ``DIFFALIGN_DEBUG=1`` shows one for these too). The classes also derive from the built-in
exception a caller would expect (``ValueError``, ``RuntimeError``), so ``except ValueError`` keeps working.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class DiffalignError(Exception):
    """A problem the user can fix; the message says how. Printed as one line by the CLI."""

    exit_code = 2
    kind = "error"


class ConfigError(DiffalignError, ValueError):
    """A config key, value or command-line option that cannot work."""


class DataError(DiffalignError, ValueError):
    """Bad input that cannot be skipped: a schema mismatch, or any bad record under ``data.strict=true``."""


class MissingFile(DataError, FileNotFoundError):
    """A file or folder the user named is not there: a ``DataError`` (one line from the CLI) that is also a
    ``FileNotFoundError`` for callers that catch that."""


class ModelError(DiffalignError, ValueError):
    """A model, LoRA or checkpoint that cannot be loaded or does not fit the request."""


class TrainingStopped(DiffalignError, RuntimeError):
    """The run stopped early (repeated non-finite steps, or a non-finite update); finite checkpoints are kept."""

    exit_code = 3
    kind = "stopped"


def closest(name: str, candidates: Iterable[str]) -> str:
    """A hint for a misspelt ``name``: " Did you mean 'x'?" or the list of valid keys."""
    candidates = list(candidates)
    match = difflib.get_close_matches(name, candidates, n=1, cutoff=0.5)
    return f" Did you mean '{match[0]}'?" if match else f" Valid keys: {', '.join(sorted(candidates))}."
