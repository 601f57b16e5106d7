"""The one exception type that carries a message meant for the user, how it reaches the user, and the one-line
summary of any other exception that a user message quotes."""

from __future__ import annotations

import os
import re
import sys
from types import TracebackType

_COLOUR = re.compile(r"\x1b\[[0-9;]*m")  # torch colours parts of its messages


class MedmtlError(Exception):
    """Bad input or configuration, described for a user.

    The message names the file, series or setting at fault and what is wrong with it. The command line
    prints it as one line and exits non-zero; batch jobs record it and carry on with the other inputs.
    """


def medmtl_cause(err: BaseException | None) -> MedmtlError | None:
    """The `MedmtlError` behind an exception, if any: MONAI's config parser wraps what a bundle config
    expression raised in RuntimeErrors, so the user's message sits somewhere down the chain.

    Args:
        err: the exception caught.

    Returns:
        the first `MedmtlError` in its cause/context chain (itself included), or None.
    """
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, MedmtlError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def innermost_cause(err: BaseException) -> BaseException:
    """The exception at the bottom of an explicit ``raise ... from`` chain: what MONAI's wrappers wrapped.

    Args:
        err: the exception caught.

    Returns:
        the last ``__cause__`` in the chain (`err` itself when it has none).
    """
    while err.__cause__ is not None:
        err = err.__cause__
    return err


def error_summary(err: BaseException, *, typed: bool = False, joined: bool = False, limit: int | None = None) -> str:
    """An exception as one line for a user message: the one summary of a library's error that medmtl shows.

    Args:
        err: the exception.
        typed: prefix its type name (``"OSError: ..."``), for errors whose message alone says too little.
        joined: join all lines of the message (``"; "``, or a space after a ``:``) instead of taking the first:
            pydicom lists each decoder's complaint on a line of its own.
        limit: cut the text to this many characters (ending ``...``).

    Returns:
        the first (or every) non-empty line of the message, colour codes removed; the type name alone when the
        message is empty.
    """
    lines = [line.strip() for line in _COLOUR.sub("", str(err)).splitlines() if line.strip()]
    text = ""
    for line in lines if joined else lines[:1]:
        text += ("" if not text else " " if text.endswith(":") else "; ") + line
    if typed or not text:
        text = f"{type(err).__name__}: {text}" if text else type(err).__name__
    return text if limit is None or len(text) <= limit else text[: limit - 3] + "..."


def show_user_errors_as_one_line() -> None:
    """Make an uncaught exception that carries a `MedmtlError` print as ``error: <message>`` (exit status 1).

    For ``python -m monai.bundle run``, which has no handler of its own: without this, a bad setting or dataset
    found while a config is being evaluated ends in a long traceback through MONAI's parser. Other exceptions,
    and every exception when ``MEDMTL_DEBUG`` is set, keep Python's traceback. Safe to call more than once.
    """
    previous = sys.excepthook
    if getattr(previous, "medmtl", False):
        return

    def hook(kind: type[BaseException], err: BaseException, tb: TracebackType | None) -> None:
        cause = medmtl_cause(err)
        if cause is None or os.environ.get("MEDMTL_DEBUG"):
            previous(kind, err, tb)
        else:
            print(f"error: {cause} (MEDMTL_DEBUG=1 shows the traceback)", file=sys.stderr, flush=True)

    hook.medmtl = True  # type: ignore[attr-defined]
    sys.excepthook = hook


def printable_console() -> None:
    """Let stdout and stderr print any text: a character the stream cannot encode (a file name in another
    encoding, a strict ASCII or UTF-8 terminal) shows as an escape instead of ending the run with a traceback."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.reconfigure(errors="backslashreplace")
        except (AttributeError, ValueError, OSError):  # not a text stream that can be reconfigured
            pass
