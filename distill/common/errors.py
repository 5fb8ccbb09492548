"""One exception type for bad user input, and the CLI wrapper that prints it as one line."""

from __future__ import annotations

import argparse
import functools
import sys


class UsageError(ValueError):
    """Bad input from the user. The message names the bad value and the fix."""


def quiet_library_progress() -> None:
    """transformers 5 draws a progress bar for every weight load: noise on a CLI's stderr."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def cli_entry(main):
    """Wrap a console-script ``main`` so a UsageError becomes one stderr line and exit code 2."""

    @functools.wraps(main)
    def wrapper(argv=None):
        quiet_library_progress()
        try:
            return main(argv)
        except UsageError as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(2) from None

    return wrapper


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (and exit code 2), like every other bad input."""

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")
