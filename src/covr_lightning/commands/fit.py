"""``covr-lightning fit``: train one run from a recipe (a sweep of seeds is ``commands.sweep``).

The builder picks the loop: :class:`~covr_lightning.loop.rl_loop.RLLoop` when ``covr.enabled`` is
false, :class:`~covr_lightning.loop.covr_loop.COVRLoop` when it is true. ``--dry-run`` prints the
fully resolved config (bases merged, defaults filled in: what the run would save as
``config.yaml``), the training plan and COVR's rounds, and builds nothing.
"""

from __future__ import annotations

import argparse

from jsonargparse import Namespace
from rich.console import Console
from rich.table import Table

from covr_lightning.config import dump_config, load_recipe, run_directory
from covr_lightning.errors import ConfigError
from covr_lightning.loop.plan import plan_table, schedule_of


def print_dry_run(cfg: Namespace, plan: Table | None = None) -> None:
    """The resolved config (YAML, on stdout), then the plan and the round table.

    Args:
        cfg: The resolved recipe.
        plan: The plan table to show (a sweep adds its rows); default: the run's plan.
    """
    print(dump_config(cfg), end="")
    console = Console()
    console.print(plan if plan is not None else plan_table(cfg, run_directory(cfg)))
    if (rounds := schedule_of(cfg)) is not None:
        console.print(rounds)


def fit(
    cfg: Namespace,
    resume: str | None = None,
    parent_run_id: str | None = None,
    show_plan: bool = True,
) -> dict[str, float]:
    """Train one run to its budget.

    Args:
        cfg: The resolved recipe.
        resume: ``None`` for a fresh run, ``"last"`` or a checkpoint/run path to continue one.
        parent_run_id: MLflow run id of a seed sweep's parent (this run becomes its child).
        show_plan: Print the training plan on stderr first (a sweep prints it once instead).

    Returns:
        The final evaluation's metrics (``eval/return``, ...).

    Raises:
        ConfigError: A recipe value, checkpoint or machine the run cannot use.
    """
    from covr_lightning.build import build_loop  # the run's stacks; --dry-run never needs them

    loop = build_loop(cfg, resume=resume, parent_run_id=parent_run_id)
    if show_plan:
        Console(stderr=True).print(plan_table(cfg, loop.run_dir))
    return loop.fit()


def run(args: argparse.Namespace) -> int:
    """``covr-lightning fit`` without ``--seeds``."""
    if args.parallel is not None:
        raise ConfigError("--parallel without --seeds", "add --seeds, e.g. --seeds 1,2,3")
    if args.launcher != "local" or args.slurm:
        flag = f"--launcher {args.launcher}" if args.launcher != "local" else "--slurm"
        raise ConfigError(f"{flag} without --seeds", "add --seeds, e.g. --seeds 1 for one seed")
    cfg = load_recipe(args.recipe, args.overrides)
    if args.dry_run:
        print_dry_run(cfg)
        return 0
    fit(cfg, resume=args.resume, parent_run_id=args.parent_run_id, show_plan=not args.parent_run_id)
    return 0
