"""User-facing errors: bad input is reported as one line naming the problem and the fix, never a traceback."""

import sys
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class UserError(Exception):
    """Bad user input: the message names the problem and the fix."""


def run_cli(main: Callable[[], T]) -> T:
    """Run an entry point; a `UserError` (or Ctrl-C) ends the process with one line on stderr."""
    try:
        return main()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
