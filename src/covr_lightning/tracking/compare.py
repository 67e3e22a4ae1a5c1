"""``covr-lightning compare``: seeds and ablations side by side, read back from MLflow.

Runs of one experiment are grouped by logged params (``--group-by``); for each group the table
gives, at the final budget (each run's last value of the metric) and at chosen env steps (each
run's value at its last logged step <= that env step), the number of runs, mean, std (sample,
ddof=1), median and IQM with a stratified bootstrap 95 % CI across seeds (rliable). The table is
printed and written as ``comparison.md`` / ``comparison.csv``; learning curves (mean and 95 %
bootstrap CI of the mean, per group) go to ``learning_curves.png``. The parent run of a seed sweep
(``fit --seeds``) is left out; its children are the runs. See ``docs/comparing.md``.
"""

from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from covr_lightning.errors import ConfigError
from covr_lightning.tracking.mlflow import resolve_tracking_uri

DEFAULT_METRIC = "eval/return"
DEFAULT_GROUP_BY = "run.name"
BOOTSTRAP_REPS = 2000  # table CIs; the curves use fewer (one bootstrap per grid step)
CURVE_BOOTSTRAP_REPS = 500
_SEED_SUFFIX = re.compile(r"[-_.]?seed[-_]?\d+$")

# The paper's numbers (../shared/docs/method.md, "Numbers to compare against"): per DMC
# (domain, task) and base algorithm, (base alone, base with COVR, env-step budget).
PAPER_DMC: dict[tuple[str, str], dict[str, tuple[float | None, float, int]]] = {
    ("cartpole", "swingup"): {
        "SAC": (237, 740, 100_000),
        "DeepMDP": (389, 793, 100_000),
        "RAD": (694, 872, 100_000),
    },
    ("cheetah", "run"): {
        "SAC": (118, 156, 100_000),
        "DeepMDP": (306, 352, 100_000),
        "RAD": (364, 504, 100_000),
    },
    ("walker", "walk"): {
        "SAC": (95, 194, 100_000),
        "DeepMDP": (384, 397, 100_000),
        "RAD": (552, 802, 100_000),
    },
    ("reacher", "easy"): {"RAD": (None, 969, 100_000)},
    ("finger", "spin"): {"RAD": (None, 976, 100_000)},
    ("ball_in_cup", "catch"): {"RAD": (None, 960, 100_000)},
    ("hopper", "hop"): {"RAD": (None, 188, 500_000)},
    ("walker", "run"): {"RAD": (None, 485, 500_000)},
    ("pendulum", "swingup"): {"RAD": (None, 792, 500_000)},
}


# CARLA (episode reward, driving distance on DBC's scale) per scenario: COVR, and the bases the
# paper reports for #HW. The paper's CARLA base for COVR is not named, so a base run shows SAC's.
PAPER_CARLA: dict[str, dict[str, tuple[float, float]]] = {
    "highway": {"COVR": (248, 259), "SAC": (69, 91)},
    "ghost_pedestrian": {"COVR": (235, 237)},
}


def base_algorithm(policy_class_path: str) -> str | None:
    """``...policies.rad.RADModule`` -> ``RAD``; DeepMDP and plain SAC likewise; else ``None``."""
    name = policy_class_path.lower()
    if "deepmdp" in name:
        return "DeepMDP"
    if "rad" in name.rsplit(".", 1)[-1] or ".rad." in name:
        return "RAD"
    if "sac" in name:
        return "SAC"
    return None


def _truthy(value: str | None) -> bool:
    return str(value).strip().lower() in ("true", "1", "yes")


def paper_number(params: dict[str, str]) -> str:
    """The paper's number for a run's (domain, task, base, COVR on/off), or ``""``.

    CARLA runs (an ``env.scenario`` of :data:`PAPER_CARLA`) get the scenario's episode reward
    and driving distance.
    """
    scenario = params.get("env.scenario")
    if scenario in PAPER_CARLA:
        tag = {"highway": "#HW", "ghost_pedestrian": "#GP"}[scenario]
        name = "COVR" if _truthy(params.get("covr.enabled")) else "SAC"
        entry = PAPER_CARLA[scenario].get(name)
        if entry is None:
            return ""
        return f"{entry[0]:g} reward / {entry[1]:g} distance ({name}, {tag})"
    key = (params.get("env.domain", ""), params.get("env.task", ""))
    base = base_algorithm(params.get("policy.class_path", ""))
    entry = PAPER_DMC.get(key, {}).get(base or "")
    if entry is None:
        return ""
    base_value, covr_value, budget = entry
    with_covr = _truthy(params.get("covr.enabled"))
    value = covr_value if with_covr else base_value
    if value is None:
        return ""
    label = f"COVR on {base}" if with_covr else base
    return f"{value:g} ({label}, {budget // 1000}k)"


def iqm(values: np.ndarray) -> float:
    """Interquartile mean (25 % trimmed mean) via :func:`rliable.metrics.aggregate_iqm`."""
    from rliable import metrics

    return float(metrics.aggregate_iqm(np.asarray(values, dtype=float).reshape(-1, 1)))


def bootstrap_ci(
    values: np.ndarray, statistic: str = "iqm", reps: int = BOOTSTRAP_REPS, seed: int = 0
) -> tuple[float, float, float]:
    """Point estimate and stratified bootstrap 95 % CI across runs (``rly.get_interval_estimates``).

    Args:
        values: One score per run (seed).
        statistic: ``"iqm"`` or ``"mean"``.
        reps: Bootstrap replications.
        seed: Seed of the bootstrap's random state (the same inputs give the same CI).

    Returns:
        ``(point, low, high)``; with a single run the interval collapses to the point.
    """
    from rliable import library as rly
    from rliable import metrics

    scores = np.asarray(values, dtype=float).reshape(-1, 1)  # runs x tasks (one task)
    aggregate = metrics.aggregate_iqm if statistic == "iqm" else metrics.aggregate_mean
    # rliable 1.2's StratifiedBootstrap draws its indices from numpy's global RNG and ignores
    # `random_state` (which arch 7 also deprecates): seed the global RNG and restore it after.
    saved = np.random.get_state()
    np.random.seed(seed)
    try:
        point, interval = rly.get_interval_estimates(
            {"g": scores}, lambda x: np.array([aggregate(x)]), reps=reps
        )
    finally:
        np.random.set_state(saved)
    return float(point["g"][0]), float(interval["g"][0, 0]), float(interval["g"][1, 0])


@dataclass
class RunCurve:
    """One run's metric history, sorted by env step (the last value wins on repeated steps)."""

    run_id: str
    name: str
    params: dict[str, str]
    steps: np.ndarray
    values: np.ndarray

    def final(self) -> float:
        return float(self.values[-1])

    def at(self, env_step: float) -> float | None:
        """Value at the last logged step <= ``env_step``; ``None`` before the first step."""
        index = int(np.searchsorted(self.steps, env_step, side="right")) - 1
        return float(self.values[index]) if index >= 0 else None


@dataclass
class Group:
    key: tuple[str, ...]
    runs: list[RunCurve] = field(default_factory=list)

    def common_param(self, name: str) -> str | None:
        values = {run.params.get(name) for run in self.runs}
        return values.pop() if len(values) == 1 else None

    def paper(self) -> str:
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


SWEEP_TAG = "covr.sweep"
"""Tag of a seed sweep's parent run (``fit --seeds``): it holds aggregates, not a seed's curve."""


def is_sweep_parent(tags: dict[str, str]) -> bool:
    """Whether a run is the parent of a seed sweep (never compared as a run of its own)."""
    return _truthy(tags.get(SWEEP_TAG))


def read_curve(client, run, metric: str) -> RunCurve | None:
    """One run's history of ``metric`` from MLflow; ``None`` when it never logged it."""
    if metric not in run.data.metrics:
        return None
    by_step: dict[int, tuple[int, float]] = {}
    for m in client.get_metric_history(run.info.run_id, metric):
        # A resumed run may log a step twice: the later value wins.
        if m.step not in by_step or m.timestamp >= by_step[m.step][0]:
            by_step[m.step] = (m.timestamp, m.value)
    steps = np.array(sorted(by_step), dtype=float)
    values = np.array([by_step[int(s)][1] for s in steps], dtype=float)
    return RunCurve(run.info.run_id, run.info.run_name or "", dict(run.data.params), steps, values)


def search_all_runs(client, experiment_id: str, filter_string: str = "") -> list:
    """Every run of an experiment matching ``filter_string`` (MLflow pages by 1000)."""
    runs, token = [], None
    while True:
        page = client.search_runs(
            [experiment_id], filter_string, max_results=1000, page_token=token
        )
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def load_runs(
    experiment: str, metric: str, include_unfinished: bool = False, uri: str = ""
) -> list[RunCurve]:
    """Read the metric history of every (finished) run of ``experiment``.

    Parents of seed sweeps (tag ``covr.sweep``) are left out: they hold the sweep's aggregates,
    and their children (``<name>-seedS``) are the runs.

    Raises:
        ConfigError: Unknown experiment, no finished runs, or the metric was never logged.
    """
    import logging

    import mlflow

    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    uri = resolve_tracking_uri(uri)
    client = mlflow.MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        known = sorted(e.name for e in client.search_experiments() if e.name != "Default")
        raise ConfigError(
            f"no MLflow experiment {experiment!r} in {uri} (experiments: "
            f"{', '.join(known) or 'none'})",
            "pass --experiment with one of those names (tracking.experiment of the recipe), "
            "or point MLFLOW_TRACKING_URI at the store the runs were logged to",
        )
    runs = [
        r for r in search_all_runs(client, found.experiment_id) if not is_sweep_parent(r.data.tags)
    ]
    statuses = [r.info.status for r in runs]
    if not include_unfinished:
        runs = [r for r in runs if r.info.status == "FINISHED"]
    if not runs:
        raise ConfigError(
            f"experiment {experiment!r} has no finished runs ({len(statuses)} runs: "
            f"{', '.join(sorted(set(statuses))) or 'none'})",
            "let a fit finish, or pass --include-unfinished",
        )
    curves, seen_metrics = [], set()
    for run in runs:
        seen_metrics.update(run.data.metrics)
        if (curve := read_curve(client, run, metric)) is not None:
            curves.append(curve)
    if not curves:
        raise ConfigError(
            f"metric {metric!r} was never logged by the runs of {experiment!r} (logged: "
            f"{', '.join(sorted(seen_metrics)[:12]) or 'nothing'})",
            "pass --metric with a logged key (see docs/metrics.md), e.g. --metric eval/return",
        )
    return curves


def group_runs(curves: list[RunCurve], group_by: list[str]) -> list[Group]:
    groups: dict[tuple[str, ...], Group] = {}
    for curve in curves:
        key = tuple(group_value(curve.params, k, curve.name) for k in group_by)
        groups.setdefault(key, Group(key)).runs.append(curve)
    return [groups[k] for k in sorted(groups)]


def summarize(values: list[float], ci: bool = True) -> dict[str, Any]:
    """n, mean, std (ddof=1), median, IQM and its bootstrap 95 % CI; blanks when n == 0.

    Args:
        values: One score per run (seed).
        ci: Compute the IQM's bootstrap CI (about half a second); without it the IQM is
            :func:`iqm` and the CI keys are left out.
    """
    n = len(values)
    if n == 0:
        return {"n": 0, "mean": math.nan, "std": math.nan, "median": math.nan,
                "iqm": math.nan, "iqm_ci_low": math.nan, "iqm_ci_high": math.nan}  # fmt: skip
    array = np.asarray(values, dtype=float)
    summary = {
        "n": n,
        "mean": float(array.mean()),
        "std": float(array.std(ddof=1)) if n > 1 else 0.0,
        "median": float(np.median(array)),
    }
    if not ci:
        return {**summary, "iqm": iqm(array)}
    point, low, high = bootstrap_ci(array, "iqm")
    return {**summary, "iqm": point, "iqm_ci_low": low, "iqm_ci_high": high}


def comparison_rows(
    groups: list[Group], group_by: list[str], at_env_steps: list[int]
) -> list[dict[str, Any]]:
    """One row per group and point (``final``, then each chosen env step)."""
    rows = []
    for group in groups:
        paper = group.paper()
        points: list[tuple[str, list[float]]] = [("final", [r.final() for r in group.runs])]
        for step in at_env_steps:
            vals = [v for r in group.runs if (v := r.at(step)) is not None]
            points.append((str(step), vals))
        for label, vals in points:
            row: dict[str, Any] = dict(zip(group_by, group.key, strict=True))
            row["at"] = label
            if label == "final":
                row["env_steps"] = "/".join(sorted({f"{int(r.steps[-1])}" for r in group.runs}))
            else:
                row["env_steps"] = label
            row.update(summarize(vals))
            row["paper"] = paper
            rows.append(row)
    return rows


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


def step_grid(runs: list[RunCurve]) -> np.ndarray:
    """The union of the runs' logged env steps: where curves across runs are evaluated."""
    return np.unique(np.concatenate([r.steps for r in runs]))


def values_at(runs: list[RunCurve], env_step: float) -> list[float]:
    """Each run's value at ``env_step`` (last logged step <= it), only within its logged span."""
    return [r.at(env_step) for r in runs if r.steps[0] <= env_step <= r.steps[-1]]  # type: ignore[misc]


def learning_curves(
    groups: list[Group], group_by: list[str], metric: str, path: Path, title: str
) -> None:
    """Mean and 95 % bootstrap CI of the mean per group over the union of the group's steps.

    At each step of the union, a run contributes its value at its last logged step <= that step
    (the table's rule), and only from its first to its last logged step: no extrapolation.
    """
    from matplotlib.figure import Figure

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


def parse_steps(text: str) -> list[int]:
    """``"2500,5000"`` -> ``[2500, 5000]``.

    Raises:
        ConfigError: A step is not a non-negative integer.
    """
    if not text:
        return []
    try:
        steps = [int(float(s)) for s in text.split(",") if s.strip()]
    except ValueError as err:
        raise ConfigError(
            f"--at-env-steps {text!r} is not a comma-separated list of env steps",
            "pass e.g. --at-env-steps 2500,5000",
        ) from err
    if any(s < 0 for s in steps):
        raise ConfigError(f"--at-env-steps {text!r} has a negative step", "use env steps >= 0")
    return steps


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
            "run's last value; an env step: each run's value at its last logged step <= it. "
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


COMPARISON_FILES = ("comparison.md", "comparison.csv", "learning_curves.png")


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


def print_table(rows: list[dict[str, Any]], group_by: list[str], title: str) -> None:
    """The comparison as a terminal table (numbers never cut; names and paper fold)."""
    from rich.console import Console
    from rich.table import Table

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


def cmd_compare(args) -> int:
    """The ``compare`` subcommand: print the table, write .md/.csv/.png to ``--out``."""
    group_by = [k.strip() for k in args.group_by.split(",") if k.strip()]
    if not group_by:
        raise ConfigError("--group-by is empty", "pass param keys, e.g. --group-by run.name")
    rows, out = compare(
        args.experiment,
        args.metric,
        group_by,
        parse_steps(args.at_env_steps),
        Path(args.out) if args.out else None,
        args.include_unfinished,
    )
    print_table(rows, group_by, f"{args.experiment}: {args.metric}")
    print(f"wrote {out}/{', '.join(COMPARISON_FILES)}")
    return 0
