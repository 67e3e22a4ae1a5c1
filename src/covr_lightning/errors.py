"""User-facing errors: one line naming the problem and the fix.

The CLI turns a :class:`ConfigError` into a single line on stderr and exit code 2. Raise it only for
what a user can fix (a recipe value, a flag, a file, missing weights, a server, the machine). Our own
bugs are ordinary exceptions (``RuntimeError``, ``ValueError``, ``assert`` for invariants) and keep
their traceback. The exit codes are named here because a sweep reads its subprocesses' codes;
``cli.py`` is the only place that maps errors to them and prints the line.
"""

from __future__ import annotations

EXIT_USER_ERROR = 2
"""Exit code of a user error (``covr-lightning`` maps a :class:`ConfigError` to it)."""
EXIT_INTERRUPTED = 130
"""Exit code after Ctrl-C or SIGTERM (a checkpoint was written first)."""
EXIT_CRASHED = 1
"""Exit code when a run died of a bug (a traceback, not a one-line error)."""


class ConfigError(Exception):
    """Bad input from the user: a recipe typo, a wrong type, a missing file, server or weights.

    Args:
        problem: What is wrong, naming the key, path or value.
        fix: What the user should do about it.
    """

    def __init__(self, problem: str, fix: str = "") -> None:
        self.problem = problem.rstrip(".")
        self.fix = fix.rstrip(".")
        super().__init__(self.line())

    def line(self) -> str:
        """The one-line message the CLI prints."""
        return f"{self.problem}. Fix: {self.fix}." if self.fix else f"{self.problem}."


class TrainingDivergedError(ConfigError):
    """A loss or metric became NaN/inf; the last good checkpoint is left untouched."""


class RunsFailed(ConfigError):
    """Some runs of a sweep did not finish; the others did, and their results are kept.

    Args:
        problem: Which runs did not finish.
        fix: How to continue.
        crashed: Whether any of them died of a bug rather than a user error (exit code 1
            instead of 2).
    """

    def __init__(self, problem: str, fix: str = "", crashed: bool = False) -> None:
        super().__init__(problem, fix)
        self.crashed = crashed
