"""User-facing errors: one line naming the problem and the fix.

The CLI turns a :class:`ConfigError` into a single line on stderr and exit code 2. Internal invariants
use ``assert``; anything else that escapes is a bug and keeps its traceback under ``--debug``.
"""

from __future__ import annotations


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


def require_all(checks: list[tuple[bool, str]], fix: str = "fix the value in the recipe") -> None:
    """Raise a :class:`ConfigError` for the first ``(ok, problem)`` pair whose ``ok`` is false."""
    for ok, problem in checks:
        if not ok:
            raise ConfigError(problem, fix)


def require_positive_ints(values: dict[str, object], prefix: str = "") -> None:
    """Raise a :class:`ConfigError` naming the first value that is not an integer >= 1.

    Args:
        values: Option values by name; ``None`` counts as unset and passes (optional caps such
            as ``max_episode_env_steps``).
        prefix: Recipe section the names live in (``"env."``), for the fix.
    """
    for name, value in values.items():
        if value is None:
            continue
        if not isinstance(value, int | float) or int(value) != value or value < 1:
            raise ConfigError(
                f"{name}={value} is not a positive integer", f"set {prefix}{name} >= 1"
            )


class TrainingDivergedError(ConfigError):
    """A loss or metric became NaN/inf; the last good checkpoint is left untouched."""
