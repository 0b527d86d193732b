"""How every command of ours starts, logs and fails. One copy, used by every ``python -m`` entry point.

Contract (the failure semantics a user relies on):

* ``UserError``: the user's input is wrong (a file, a key, a value, a store). The command prints
  ``error: <message>`` as **one line** on stderr and exits with **2**. The message names the file or key and
  says what is wrong. Raise it (or a subclass) wherever such input is first checked; never catch it to log
  and carry on.
* Any other exception is a bug: Python's traceback is shown and the exit code is 1.
* ``--debug`` shows the traceback for any error, a ``UserError`` included.
* ``--log-level`` sets the root logger's level. Log lines go through ``tqdm.write``, so a progress bar on the
  same terminal is not torn apart by them.

Usage in a module::

    def main(argv=None) -> int:
        parser = argparse.ArgumentParser(...)
        cli.add_common_arguments(parser)
        args = parser.parse_args(argv)
        cli.setup_logging(args.log_level)
        ...

    if __name__ == "__main__":
        raise SystemExit(cli.run(main))
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from pathlib import Path
from typing import Callable, Sequence

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


class UserError(Exception):
    """Wrong input from the user: shown as one line, exit code 2 (see the module docstring)."""


def add_common_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--log-level", default="INFO", choices=LEVELS, type=str.upper,
                        help="root logging level (default: INFO)")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback for any error, user errors included")
    return parser


class _TqdmHandler(logging.StreamHandler):
    """A stderr handler that writes through ``tqdm.write`` so that open progress bars are redrawn below it."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=self.stream or sys.stderr)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


def setup_logging(level: str | int = "INFO", *, fmt: str = LOG_FORMAT, file: str | Path | None = None) -> None:
    """Configure the root logger once per process: a tqdm-safe stderr handler and, optionally, a log file.

    Calling it again replaces the handlers it installed (a second call never duplicates lines).
    """
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_pano_distill", False):
            root.removeHandler(h)
            h.close()
    handlers: list[logging.Handler] = [_TqdmHandler(sys.stderr)]
    if file is not None:
        handlers.append(logging.FileHandler(file))
    for h in handlers:
        h.setFormatter(logging.Formatter(fmt))
        h._pano_distill = True  # type: ignore[attr-defined]
        root.addHandler(h)
    root.setLevel(level if isinstance(level, int) else getattr(logging, str(level).upper()))


def run(main: Callable[[list[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Call ``main(argv)`` and turn its failure into the exit code and message of the contract above."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        return int(main(args) or 0)
    except UserError as err:
        if "--debug" in args:
            traceback.print_exc()
        message = " ".join(str(err).split("\n")) or type(err).__name__
        print(f"error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
