"""User errors: a mistake in what the user gave (a path, a key, a value), reported as one clear
message and exit status 2, never a Python traceback. Tracebacks are for bugs, and for
``HYDRA_FULL_ERROR=1``.

Every error a user can fix subclasses :class:`UserError`; entry points wrap their body in
:func:`report_user_errors`.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable
from typing import TypeVar

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable)


class UserError(Exception):
    """Something the user gave is wrong; the message names it and says what to do."""


def full_error() -> bool:
    """Whether the user asked for tracebacks (Hydra's own switch)."""
    return os.environ.get("HYDRA_FULL_ERROR") == "1"


def report_user_errors(fn: F) -> F:
    """Run ``fn``; a :class:`UserError` is printed to stderr and exits with status 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as err:
            if full_error():
                raise
            # stderr, not logging: the one message the user must see, whatever the log settings
            print(f"error: {err}", file=sys.stderr, flush=True)
            sys.exit(2)

    return wrapper  # type: ignore[return-value]
