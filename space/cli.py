"""Helpers for the stage scripts: argument parsing and one clear error line per failure."""
from __future__ import annotations

import argparse
import logging
import signal
import sys
from typing import Callable

from tqdm import tqdm

PARAMS = "params.yaml"


class TqdmLogHandler(logging.Handler):
    """Writes log records to stderr through ``tqdm.write``, above any progress bar instead of into it."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging's own convention
            self.handleError(record)


def stage_main(description: str, main: Callable[[argparse.Namespace], None]) -> None:
    """Parse ``experiment [--params FILE]`` and run ``main``; a user error exits 1 with one message."""
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:  # from here on, Ctrl-C is a KeyboardInterrupt
        signal.signal(signal.SIGINT, signal.default_int_handler)
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("experiment", help="experiment name, a key under 'exp' in params.yaml")
    parser.add_argument("--params", default=PARAMS, help="params file (default: params.yaml)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", handlers=[TqdmLogHandler()])
    try:
        main(args)
    except (ValueError, FileNotFoundError, RuntimeError, ImportError, OSError) as error:
        # Library messages name `<experiment>` where a command needs it; here it is known.
        print(f"error: [{args.experiment}] {str(error).replace('@<experiment>', '@' + args.experiment)}",
              file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print(f"error: [{args.experiment}] interrupted", file=sys.stderr)
        sys.exit(130)  # the shell's code for SIGINT
