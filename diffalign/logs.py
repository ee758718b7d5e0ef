"""Messages through ``accelerate.logging``: printed once per run, not once per process.

    >>> logger = get_logger("diffalign.example")
    >>> logger.info("data: kept %d records", 64)                       # the main process only
    data: kept 64 records
    >>> logger.warning("rank-local problem", main_process_only=False)  # every process, prefixed with its rank
    rank-local problem

The ``diffalign`` logger writes plain lines to the *current* ``sys.stdout`` (looked up at each message, so
redirection and pytest's capture see them), at level INFO. Set ``DIFFALIGN_LOG_LEVEL=WARNING`` to quieten it,
or configure the ``diffalign`` logger as any other.
"""

from __future__ import annotations

import logging
import os
import sys

from accelerate.logging import MultiProcessAdapter
from accelerate.state import PartialState

ROOT = "diffalign"


class _CurrentStdout(logging.StreamHandler):
    """A handler bound to whatever ``sys.stdout`` is when a message is written."""

    def __init__(self):
        super().__init__(sys.stdout)

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stdout  # not setStream: that flushes the old stream, which may be closed by now
        super().emit(record)


class _Adapter(MultiProcessAdapter):
    """accelerate's adapter, usable before any ``Accelerator`` exists (a library call, ``diffalign score``): a
    single process then. A message every process logs (``main_process_only=False``) is prefixed with the rank
    when there is more than one."""

    def log(self, level, msg, *args, main_process_only: bool = True, **kwargs):
        if not self.isEnabledFor(level):
            return
        state = PartialState()  # a single-process state when nothing has set one up yet
        if main_process_only and not state.is_main_process:
            return
        if not main_process_only and state.num_processes > 1:
            msg = f"[rank {state.process_index}] {msg}"
        kwargs.setdefault("stacklevel", 2)
        self.logger.log(level, msg, *args, **kwargs)


def _configure_root() -> logging.Logger:
    root = logging.getLogger(ROOT)
    if not any(isinstance(handler, _CurrentStdout) for handler in root.handlers):
        handler = _CurrentStdout()
        handler.setFormatter(logging.Formatter("%(message)s"))
        root.addHandler(handler)
        root.setLevel(os.environ.get("DIFFALIGN_LOG_LEVEL", "INFO").upper())
        root.propagate = False
    return root


def get_logger(name: str) -> _Adapter:
    """The logger for module ``name`` (pass ``__name__``), as ``accelerate.logging.get_logger`` gives."""
    _configure_root()
    return _Adapter(logging.getLogger(name), {})
