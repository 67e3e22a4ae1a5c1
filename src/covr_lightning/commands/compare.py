"""``covr-lightning compare``: seeds and ablations side by side, read back from MLflow."""

from __future__ import annotations

import argparse
from pathlib import Path

from covr_lightning.errors import ConfigError
from covr_lightning.tracking.compare import compare
from covr_lightning.tracking.report import COMPARISON_FILES, print_table


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


def run(args: argparse.Namespace) -> int:
    """Print the table and write ``comparison.md`` / ``.csv`` / ``learning_curves.png``."""
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
