"""The two kinds of failure the CLI turns into exit codes.

``UserError`` (exit 2): bad input: usage, unreadable model, invalid recipe or data. Raised before
any work starts whenever possible.
``WorkFailed`` (exit 1): the work ran but did not succeed: a gate not met, a pass that could not
meet its tolerance, a crashed or timed-out worker.

Messages are one line and name the file or the recipe key and the cause.
"""


class DeployoptError(Exception):
    """Base class; ``exit_code`` is what the CLI exits with."""

    exit_code = 1


class UserError(DeployoptError):
    """Bad input: exit code 2."""

    exit_code = 2


class WorkFailed(DeployoptError):
    """The work ran and failed: exit code 1."""

    exit_code = 1
