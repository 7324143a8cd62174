"""The two kinds of failure the CLI turns into exit codes.

``UserError`` (exit 2): bad input: usage, unreadable model, invalid recipe or data. Raised before
any work starts whenever possible.
``WorkFailed`` (exit 1): the work ran but did not succeed: a gate not met, a pass that could not
meet its tolerance, a crashed or timed-out worker.

Messages are one line and name the file or the recipe key and the cause; ``one_line`` makes any
error text fit that rule.
"""

import re

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class DeployoptError(Exception):
    """Base class; ``exit_code`` is what the CLI exits with."""

    exit_code = 1


class UserError(DeployoptError):
    """Bad input: exit code 2."""

    exit_code = 2


class WorkFailed(DeployoptError):
    """The work ran and failed: exit code 1."""

    exit_code = 1


def one_line(error: BaseException | str, limit: int = 300, *, with_type: bool = False) -> str:
    """An error message as one line of at most ``limit`` characters.

    Whitespace (newlines included) collapses to single spaces and terminal colour codes are
    dropped, so result rows and stderr stay one line whatever a library printed. An empty message
    becomes the exception's type name; ``with_type`` always prefixes it (``TypeError: ...``).
    """
    text = " ".join(_ANSI.sub("", str(error)).split())
    if isinstance(error, BaseException) and (with_type or not text):
        text = f"{type(error).__name__}: {text}" if text else type(error).__name__
    text = text or "unknown error"
    return text if len(text) <= limit else text[: limit - 3] + "..."
