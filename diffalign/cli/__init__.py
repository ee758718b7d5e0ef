"""``diffalign``: the command line, thin argument parsing over library functions.

    diffalign COMMAND --help        # each command's flags, with working examples
    diffalign list [KIND]           # what each registry holds (objectives, rewards, samplers, ...)

Errors by kind: a ``DiffalignError`` (a config, data or model problem the user can fix) is printed as one line,
``diffalign <command>: error: <message>``, exit code 2; a run that stopped itself (``TrainingStopped``) as
``diffalign <command>: stopped: <message>``, exit code 3; Ctrl-C as ``interrupted``, exit code 130. Anything else
is a bug and shows its traceback. ``--debug`` (or ``DIFFALIGN_DEBUG=1``) shows the traceback of a
``DiffalignError`` too.

Modules: ``parser`` (one builder per command), ``options`` (shared flag groups and value parsing), ``commands``
(the handlers), ``listing`` (``diffalign list``), ``examples`` (the ``--help`` epilogs).
"""

from __future__ import annotations

import os
import sys

from diffalign.cli.examples import (
    EVAL_EXAMPLES,
    EXPORT_EXAMPLES,
    LIST_EXAMPLES,
    MAIN_EXAMPLES,
    PAIRS_EXAMPLES,
    SAMPLE_EXAMPLES,
    SCORE_EXAMPLES,
    TINY_EXAMPLES,
    TRAIN_EXAMPLES,
)
from diffalign.cli.parser import build_parser
from diffalign.errors import DiffalignError

FALSE_WORDS = ("", "0", "false", "no", "off")


def debug_requested(flag: bool) -> bool:
    """``--debug`` or a true ``DIFFALIGN_DEBUG`` (anything but empty, 0, false, no, off)."""
    return flag or os.environ.get("DIFFALIGN_DEBUG", "").strip().lower() not in FALSE_WORDS


def main(argv: list[str] | None = None) -> int:
    """Run ``diffalign`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        code = args.handler(args)
        sys.stdout.flush()  # inside the try: a reader that left early shows here, not as a warning at exit
        return code
    except DiffalignError as error:
        if debug_requested(args.debug):
            raise
        print(f"diffalign {args.command}: {error.kind}: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:  # Ctrl-C: the run's finally blocks (lock, progress bars) have run; no traceback
        print(f"diffalign {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `diffalign list | head`: the reader left early; silence the flush at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, as a shell reports it


__all__ = ["EVAL_EXAMPLES", "EXPORT_EXAMPLES", "LIST_EXAMPLES", "MAIN_EXAMPLES", "PAIRS_EXAMPLES", "SAMPLE_EXAMPLES",
           "SCORE_EXAMPLES", "TINY_EXAMPLES", "TRAIN_EXAMPLES", "build_parser", "main"]
