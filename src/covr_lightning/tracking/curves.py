"""A run's metric history on the env-step axis, and how curves of several runs line up."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class RunCurve:
    """One run's metric history, sorted by env step (the last value wins on repeated steps)."""

    run_id: str
    name: str
    params: dict[str, str]
    steps: np.ndarray
    values: np.ndarray

    def final(self) -> float:
        """The last logged value."""
        return float(self.values[-1])

    def auc(self) -> float:
        """Area under the curve over its env-step span, divided by that span: the mean value over
        training (trapezoids between logged steps); the single value for a one-point curve."""
        if len(self.steps) < 2:
            return float(self.values[-1])
        area = float(np.sum(np.diff(self.steps) * (self.values[1:] + self.values[:-1]) / 2))
        return area / float(self.steps[-1] - self.steps[0])

    def at(self, env_step: float) -> float | None:
        """Value at the last logged step <= ``env_step``; ``None`` before the first step."""
        index = int(np.searchsorted(self.steps, env_step, side="right")) - 1
        return float(self.values[index]) if index >= 0 else None


def step_grid(runs: list[RunCurve]) -> np.ndarray:
    """The union of the runs' logged env steps: where curves across runs are evaluated."""
    return np.unique(np.concatenate([r.steps for r in runs]))


def values_at(runs: list[RunCurve], env_step: float) -> list[float]:
    """Each run's value at ``env_step`` (last logged step <= it), only within its logged span."""
    return [r.at(env_step) for r in runs if r.steps[0] <= env_step <= r.steps[-1]]  # type: ignore[misc]
