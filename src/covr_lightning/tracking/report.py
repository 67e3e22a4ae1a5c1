"""Rendering a comparison: Markdown and CSV tables, learning curves, the terminal table."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from rich.console import Console
from rich.table import Table

from covr_lightning.tracking.curves import step_grid, values_at
from covr_lightning.tracking.stats import CURVE_BOOTSTRAP_REPS, bootstrap_ci

COMPARISON_FILES = ("comparison.md", "comparison.csv", "learning_curves.png")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.1f}"
    return str(value)


_COLUMNS = ("at", "env_steps", "n", "mean", "std", "median", "iqm", "iqm_95ci", "paper")


def _cells(row: dict[str, Any], group_by: list[str]) -> list[str]:
    ci = (
        ""
        if math.isnan(row["iqm_ci_low"])
        else f"[{row['iqm_ci_low']:.1f}, {row['iqm_ci_high']:.1f}]"
    )
    values = {**row, "iqm_95ci": ci}
    return [_fmt(row[k]) for k in group_by] + [_fmt(values[c]) for c in _COLUMNS]


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def write_markdown(
    rows: list[dict[str, Any]], group_by: list[str], path: Path, title: str, notes: str
) -> None:
    header = [*group_by, *_COLUMNS]
    lines = [f"# {title}", "", notes, "", "| " + " | ".join(header) + " |"]
    lines.append("|" + "|".join(" --- " for _ in header) + "|")
    lines += ["| " + " | ".join(_cells(r, group_by)) + " |" for r in rows]
    path.write_text("\n".join(lines) + "\n")


def learning_curves(groups: list, group_by: list[str], metric: str, path: Path, title: str) -> None:
    """Mean and 95 % bootstrap CI of the mean per group over the union of the group's steps.

    At each step of the union, a run contributes its value at its last logged step <= that step
    (the table's rule), and only from its first to its last logged step: no extrapolation.
    """
    figure = Figure(figsize=(8, 5), dpi=120)
    axes = figure.add_subplot()
    for index, group in enumerate(groups):
        grid = step_grid(group.runs)
        means, lows, highs = [], [], []
        for step in grid:
            vals = values_at(group.runs, step)
            mean, low, high = bootstrap_ci(np.array(vals), "mean", reps=CURVE_BOOTSTRAP_REPS)
            means.append(mean)
            lows.append(low)
            highs.append(high)
        label = ", ".join(group.key) + f" (n={len(group.runs)})"
        color = f"C{index % 10}"
        axes.plot(grid, means, color=color, label=label, marker="o" if len(grid) < 30 else None)
        axes.fill_between(grid, lows, highs, color=color, alpha=0.2)
    axes.set_xlabel("env steps")
    axes.set_ylabel(metric)
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend(title=",".join(group_by), fontsize="small")
    figure.tight_layout()
    figure.savefig(path)


def print_table(rows: list[dict[str, Any]], group_by: list[str], title: str) -> None:
    """The comparison as a terminal table (numbers never cut; names and paper fold)."""
    table = Table(title=title, title_justify="left")
    for index, name in enumerate(group_by):  # a narrow terminal folds names, never hides them
        longest = max([len(name), *(len(_fmt(row[name])) for row in rows)])
        table.add_column(name, overflow="fold", min_width=min(longest, 12 if index else 24))
    for name in _COLUMNS:
        table.add_column(name, no_wrap=name != "paper", min_width=len(name), overflow="fold")
    for row in rows:
        table.add_row(*_cells(row, group_by))
    console = Console()
    if not console.is_terminal:  # a pipe or a file has no width: keep every column whole
        console.width = max(console.width, 160)
    console.print(table)
