"""One exception type for bad user input, and the CLI wrapper that prints it as one line."""

from __future__ import annotations

import functools
import sys


class UsageError(ValueError):
    """Bad input from the user. The message names the bad value and the fix."""


def cli_entry(main):
    """Wrap a console-script ``main`` so a UsageError becomes one stderr line and exit code 2."""

    @functools.wraps(main)
    def wrapper(argv=None):
        try:
            return main(argv)
        except UsageError as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(2) from None

    return wrapper
