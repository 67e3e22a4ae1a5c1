"""``covr-lightning compare``'s logic: runs grouped by params, one summary row per group and point.

Runs of one experiment are grouped by logged params (``--group-by``); for each group the table
gives, at the final budget (each run's last value of the metric) and at chosen env steps (each
run's value at its last logged step <= that env step), the number of runs, mean, std (sample,
ddof=1), median and IQM with a stratified bootstrap 95 % CI across seeds (rliable). The runs are
read through :mod:`covr_lightning.tracking.mlflow`, the statistics come from
:mod:`~covr_lightning.tracking.stats`, the paper's numbers from
:mod:`~covr_lightning.tracking.reference`, and :mod:`~covr_lightning.tracking.report` writes
``comparison.md`` / ``comparison.csv`` / ``learning_curves.png``. The parent run of a seed sweep
(``fit --seeds``) is left out; its children are the runs. See ``docs/comparing.md``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from covr_lightning.errors import ConfigError
from covr_lightning.tracking.curves import RunCurve
from covr_lightning.tracking.mlflow import load_runs
from covr_lightning.tracking.reference import paper_number
from covr_lightning.tracking.report import (
    learning_curves,
    write_csv,
    write_markdown,
)
from covr_lightning.tracking.stats import BOOTSTRAP_REPS, summarize

DEFAULT_METRIC = "eval/return"
DEFAULT_GROUP_BY = "run.name"
_SEED_SUFFIX = re.compile(r"[-_.]?seed[-_]?\d+$")


@dataclass
class Group:
    """Runs that share the values of the ``--group-by`` keys."""

    key: tuple[str, ...]
    runs: list[RunCurve] = field(default_factory=list)

    def common_param(self, name: str) -> str | None:
        """The value of a param all runs of the group share, or ``None``."""
        values = {run.params.get(name) for run in self.runs}
        return values.pop() if len(values) == 1 else None

    def paper(self) -> str:
        """The paper's number for the group, when its runs agree on what selects it."""
        if self.common_param("env.scenario") is not None:
            keys: tuple[str, ...] = ("env.scenario", "covr.enabled")
        else:
            keys = ("env.domain", "env.task", "policy.class_path", "covr.enabled")
        shared = {k: self.common_param(k) for k in keys}
        if any(v is None for v in shared.values()):
            return ""
        return paper_number(shared)  # type: ignore[arg-type]


def group_value(params: dict[str, str], key: str, run_name: str) -> str:
    """A run's value of one ``--group-by`` key; ``run.name`` loses a ``-seedN`` suffix."""
    if key == "run.name":
        name = params.get("run.name", run_name) or run_name
        return _SEED_SUFFIX.sub("", name) or name
    return params.get(key, "-")


def group_runs(curves: list[RunCurve], group_by: list[str]) -> list[Group]:
    """Curves grouped by their ``group_by`` values, groups sorted by key."""
    groups: dict[tuple[str, ...], Group] = {}
    for curve in curves:
        key = tuple(group_value(curve.params, k, curve.name) for k in group_by)
        groups.setdefault(key, Group(key)).runs.append(curve)
    return [groups[k] for k in sorted(groups)]


def comparison_rows(
    groups: list[Group], group_by: list[str], at_env_steps: list[int]
) -> list[dict[str, Any]]:
    """One row per group and point (``final``, ``auc``, then each chosen env step)."""
    rows = []
    for group in groups:
        paper = group.paper()
        points: list[tuple[str, list[float]]] = [
            ("final", [r.final() for r in group.runs]),
            ("auc", [r.auc() for r in group.runs]),
        ]
        for step in at_env_steps:
            vals = [v for r in group.runs if (v := r.at(step)) is not None]
            points.append((str(step), vals))
        for label, vals in points:
            row: dict[str, Any] = dict(zip(group_by, group.key, strict=True))
            row["at"] = label
            if label in ("final", "auc"):
                row["env_steps"] = "/".join(sorted({f"{int(r.steps[-1])}" for r in group.runs}))
            else:
                row["env_steps"] = label
            row.update(summarize(vals))
            row["paper"] = paper
            rows.append(row)
    return rows


def write_comparison(
    curves: list[RunCurve],
    group_by: list[str],
    at_env_steps: list[int],
    out: Path,
    title: str,
    metric: str = DEFAULT_METRIC,
) -> list[dict[str, Any]]:
    """Group and summarize ``curves``; write comparison.md/.csv and learning_curves.png to ``out``.

    Raises:
        ConfigError: ``out`` cannot be written.
    """
    groups = group_runs(curves, group_by)
    rows = comparison_rows(groups, group_by, at_env_steps)
    try:
        out.mkdir(parents=True, exist_ok=True)
        write_csv(rows, out / "comparison.csv")
        notes = (
            f"{len(curves)} runs in {len(groups)} groups by {', '.join(group_by)}. `final`: each "
            "run's last value; `auc`: each run's area under its curve divided by its env-step "
            "span (the mean value over training); an env step: each run's value at its last "
            "logged step <= it. "
            "std: sample (ddof=1); IQM: 25 % trimmed mean with a stratified bootstrap 95 % CI "
            f"across runs (rliable, {BOOTSTRAP_REPS} reps). paper: the paper's number for the "
            "task and base (at its own budget)."
        )
        write_markdown(rows, group_by, out / "comparison.md", title, notes)
        learning_curves(groups, group_by, metric, out / "learning_curves.png", title)
    except OSError as err:
        raise ConfigError(
            f"cannot write the comparison to {out} ({err.strerror or err})",
            "pass --out with a writable folder",
        ) from err
    return rows


def compare(
    experiment: str,
    metric: str = DEFAULT_METRIC,
    group_by: list[str] | None = None,
    at_env_steps: list[int] | None = None,
    out: Path | None = None,
    include_unfinished: bool = False,
) -> tuple[list[dict[str, Any]], Path]:
    """Read, group, summarize and write the comparison; returns the rows and the output folder."""
    group_by = group_by or [DEFAULT_GROUP_BY]
    curves = load_runs(experiment, metric, include_unfinished)
    out = out or Path("comparison") / re.sub(r"[^\w.-]+", "_", experiment)
    rows = write_comparison(
        curves, group_by, at_env_steps or [], out, f"{experiment}: {metric}", metric
    )
    return rows, out
