"""Errors meant for people, and the wrapper every command-line entry point runs under."""

from __future__ import annotations

import sys
from typing import Callable


class UserError(Exception):
    """Bad input or environment: printed as one line (``error: …``) and exit code 2, no traceback."""


class DamagedFile(UserError):
    """A file that should be there is truncated, bit-flipped or malformed: fatal, never a reason to fall back."""


def run_cli(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> None:
    """Run ``main(argv)``; turn :class:`UserError` into one clear line and Ctrl-C into exit 130."""
    try:
        code = main(argv)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
