"""The `autopipec-hpc` command: parse (``parser.py``), call one library function
(``commands.py``), print (``show.py``); every error is one line with its exit code."""

from __future__ import annotations

import importlib
import logging
import os
import sys

from autopipec_hpc.cli.parser import build_parser
from autopipec_hpc.errors import AutopipecError


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    debug = bool(args.debug or os.environ.get("AUTOPIPEC_DEBUG"))
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        # The command's module (and with it the science stack) is imported only now.
        command = getattr(importlib.import_module("autopipec_hpc.cli.commands"), args.func)
        return int(command(args) or 0)
    except AutopipecError as exc:
        if debug:
            raise
        _error_line(str(exc))
        return 2
    except OSError as exc:
        # A file or folder the user named that cannot be read or written.
        if debug:
            raise
        where = exc.filename or "a file"
        _error_line(f"{where}: {exc.strerror or exc}")
        return 2
    except KeyboardInterrupt as exc:
        sys.stderr.write(f"interrupted: {' '.join(str(exc).split())}\n" if str(exc) else "interrupted\n")
        return 130
    except Exception as exc:  # a bug, not a mistake of the user's: say so, in one line
        if debug:
            raise
        reason = " ".join(str(exc).split())[:300]
        _error_line(f"internal error (a bug in autopipec-hpc): {type(exc).__name__}: {reason}; "
                    "rerun with --debug (or AUTOPIPEC_DEBUG=1) for the traceback")
        return 1


def _error_line(message: str) -> None:
    """One line on stderr, however long or multi-line the message was."""
    text = " ".join(message.split())
    sys.stderr.write(f"error: {text}\n")


if __name__ == "__main__":
    sys.exit(main())
