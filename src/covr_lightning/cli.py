"""``covr-lightning``: train from a recipe (one seed, or a sweep with ``--seeds``), list recipes.

Every user error (unknown recipe, unknown key, wrong type, unwritable directory, corrupt
checkpoint, diverged training) ends with one line on stderr naming the problem and the fix and
exit code 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import signal
import sys

from covr_lightning import __version__
from covr_lightning.errors import ConfigError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (plus exit 2) like every other user error."""

    def error(self, message: str):
        self.exit(
            EXIT_USER_ERROR, f"{self.prog}: error: {message}. Fix: see `{self.prog} --help`.\n"
        )


def build_cli() -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog="covr-lightning",
        description="COVR: a pixel SAC agent and a vision-language model that train each other.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_OneLineParser)

    fit = commands.add_parser(
        "fit",
        help="train from a recipe",
        description="Train from a recipe. Overrides are dotted.key=value (policy.actor_lr=3e-4). "
        "With --seeds, one run per seed under one MLflow parent run that logs the aggregate.",
    )
    fit.add_argument("--recipe", required=True, help="packaged recipe name or path to a YAML file")
    fit.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe overrides")
    fit.add_argument(
        "--resume", metavar="last|PATH", help="continue a run from its last or a given checkpoint"
    )
    fit.add_argument(
        "--dry-run", action="store_true", help="print the resolved config and the plan, then exit"
    )
    fit.add_argument(
        "--seeds",
        metavar="LIST",
        help="run one fit per seed (1,2,3 or 1-5) under one MLflow parent run (docs/comparing.md)",
    )
    fit.add_argument(
        "--parallel",
        type=int,
        metavar="N",
        help="with --seeds: run N seeds at a time as subprocesses (default 1: one after another)",
    )
    # Set by a sweep on the fits it launches (--parallel): their runs become the parent's children.
    fit.add_argument("--parent-run-id", help=argparse.SUPPRESS)
    fit.add_argument("--debug", action="store_true", help="show tracebacks for errors")

    commands.add_parser("recipes", help="list the packaged recipes")

    evaluate = commands.add_parser(
        "evaluate",
        help="evaluate a checkpoint's deterministic policy (no VLM)",
        description="Run the deterministic policy of a checkpoint; log to the run's MLflow run.",
    )
    evaluate.add_argument(
        "--checkpoint", required=True, metavar="PATH", help="run dir, checkpoint dir or state.pt"
    )
    evaluate.add_argument("--episodes", type=int, default=10, help="episodes (default 10)")
    evaluate.add_argument("--seed", type=int, help="evaluation seed (default run.seed + 100003)")
    evaluate.add_argument("--video", action="store_true", help="record the first episode (MP4)")
    evaluate.add_argument("--video-size", type=int, default=256, help="video side in px (256)")
    evaluate.add_argument("--device", default="cpu", help="torch device of the policy (cpu)")
    evaluate.add_argument("--no-log", action="store_true", help="do not log to MLflow")
    evaluate.add_argument("--debug", action="store_true", help="show tracebacks for errors")

    export = commands.add_parser(
        "export",
        help="export the policy (encoder + actor) as TorchScript",
        description="Write the deterministic policy as a TorchScript file plus a JSON spec.",
    )
    export.add_argument(
        "--checkpoint", required=True, metavar="PATH", help="run dir, checkpoint dir or state.pt"
    )
    export.add_argument("--out", default="policy.pt", help="output file (default policy.pt)")
    export.add_argument("--debug", action="store_true", help="show tracebacks for errors")

    compare = commands.add_parser(
        "compare",
        help="compare runs of an MLflow experiment (IQM, bootstrap CI, learning curves)",
        description="Group finished runs by params; table (.md/.csv) and learning curves (.png).",
    )
    compare.add_argument(
        "--experiment", default="covr-quickstart", help="MLflow experiment (covr-quickstart)"
    )
    compare.add_argument("--metric", default="eval/return", help="metric key (eval/return)")
    compare.add_argument(
        "--group-by",
        default="run.name",
        metavar="KEYS",
        help="comma-separated param keys; run.name drops a -seedN suffix (run.name)",
    )
    compare.add_argument(
        "--at-env-steps", default="", metavar="STEPS", help="extra table points, e.g. 2500,5000"
    )
    compare.add_argument("--out", help="output folder (default comparison/<experiment>)")
    compare.add_argument(
        "--include-unfinished", action="store_true", help="also running, failed and killed runs"
    )
    compare.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    return parser


def cmd_recipes() -> int:
    from rich.console import Console
    from rich.table import Table

    from covr_lightning.config import list_recipes, packaged_recipes_dir

    table = Table(title=f"packaged recipes ({packaged_recipes_dir()})", title_justify="left")
    table.add_column("recipe", style="bold", no_wrap=True)  # names are typed: never cut them
    table.add_column("what it runs")
    for name, summary in list_recipes():
        table.add_row(name, summary)
    Console().print(table)
    return 0


def cmd_fit(args: argparse.Namespace) -> int:
    from rich.console import Console

    from covr_lightning.config import dump_config, load_recipe
    from covr_lightning.loop.covr_loop import COVRLoop
    from covr_lightning.loop.plan import plan_table, schedule_of
    from covr_lightning.loop.rl_loop import run_directory

    if args.seeds is not None:
        from covr_lightning.tracking.sweep import run_sweep

        return run_sweep(args)
    if args.parallel is not None:
        raise ConfigError("--parallel without --seeds", "add --seeds, e.g. --seeds 1,2,3")
    cfg = load_recipe(args.recipe, args.overrides)
    if args.dry_run:
        print(dump_config(cfg), end="")
        Console().print(plan_table(cfg, run_directory(cfg)))
        if (rounds := schedule_of(cfg)) is not None:
            Console().print(rounds)
        return 0
    loop = COVRLoop(cfg, resume=args.resume)  # validates the run dir and loads a checkpoint first
    if args.parent_run_id:  # one seed of a sweep: the sweep printed the plan once
        loop.tracker.parent_run_id = args.parent_run_id
    else:
        Console(stderr=True).print(plan_table(cfg, loop.run_dir))
    loop.fit()
    return 0


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``covr-lightning`` command."""
    args = build_cli().parse_args(argv)
    debug = getattr(args, "debug", False)
    # SIGTERM (e.g. a scheduler's kill) takes the same path as Ctrl-C: checkpoint, then exit.
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    try:
        if args.command == "recipes":
            return cmd_recipes()
        if args.command == "evaluate":
            from covr_lightning.evaluate import cmd_evaluate

            return cmd_evaluate(args)
        if args.command == "export":
            from covr_lightning.export import cmd_export

            return cmd_export(args)
        if args.command == "compare":
            from covr_lightning.tracking.compare import cmd_compare

            return cmd_compare(args)
        return cmd_fit(args)
    except ConfigError as err:
        if debug:
            raise
        print(f"covr-lightning: error: {err.line()}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(
            "covr-lightning: interrupted; continue with --resume last if a checkpoint was written",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
