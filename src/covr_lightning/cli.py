"""``covr-lightning``: argument parsing, then one command module of :mod:`covr_lightning.commands`.

This is the only place that knows exit codes and prints errors. Every user error (unknown
recipe, unknown key, wrong type, unwritable directory, corrupt checkpoint, diverged training) is a
:class:`~covr_lightning.errors.ConfigError`: one line on stderr naming the problem and the fix,
exit code 2 (``--debug`` shows the traceback instead). Any other exception is a bug in the
package and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
from types import ModuleType

from covr_lightning import __version__
from covr_lightning.commands.cluster import LAUNCHERS
from covr_lightning.errors import (
    EXIT_CRASHED,
    EXIT_INTERRUPTED,
    EXIT_USER_ERROR,
    ConfigError,
    RunsFailed,
)


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
    fit.add_argument(
        "--launcher",
        choices=LAUNCHERS,
        default="local",
        help="with --seeds: where the seeds run: local (this machine, default), slurm (one SLURM "
        "job per seed through submitit), submitit-local (those jobs as local processes, to test); "
        "docs/scaling.md",
    )
    fit.add_argument(
        "--slurm",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="with --launcher slurm|submitit-local, repeatable: a submitit executor parameter, "
        "e.g. partition=gpu gpus_per_node=1 cpus_per_task=8 mem_gb=64 timeout_min=240 account=X",
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
    evaluate.add_argument(
        "--episodes", type=int, help="episodes (default: the run's run.eval_episodes)"
    )
    evaluate.add_argument(
        "--seed", type=int, help="evaluation seed (default: the run's, as training evaluates)"
    )
    evaluate.add_argument("--video", action="store_true", help="record the first episode (MP4)")
    evaluate.add_argument("--video-size", type=int, default=256, help="video side in px (256)")
    evaluate.add_argument("--device", default="cpu", help="torch device of the policy (cpu)")
    evaluate.add_argument("--no-log", action="store_true", help="do not log to MLflow")
    evaluate.add_argument(
        "--vlm",
        action="store_true",
        help="play the checkpoint's VLM (its saved LoRA adapter) instead of the policy",
    )
    evaluate.add_argument(
        "--adapter",
        metavar="DIR",
        help="with --vlm: a saved adapter folder (<run>/adapters/round_<c>) instead of the "
        "checkpoint's",
    )
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


def _command(args: argparse.Namespace) -> ModuleType:
    """The command module that runs ``args`` (imported here only: ``--help`` stays fast)."""
    if args.command == "fit" and args.seeds is not None:
        return importlib.import_module("covr_lightning.commands.sweep")
    return importlib.import_module(f"covr_lightning.commands.{args.command}")


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line; ``fit``'s ``KEY=VALUE`` overrides may sit between its flags.

    argparse gives a ``nargs="*"`` positional only its first run of values, so
    ``fit --recipe q a=1 --seeds 1-3 b=2`` would refuse ``b=2``; the later runs are appended to
    the overrides in the order given (a later override of the same key wins, as always).
    """
    parser = build_cli()
    args, extra = parser.parse_known_args(argv)
    overrides = getattr(args, "overrides", None)
    late = [a for a in extra if overrides is not None and "=" in a and not a.startswith("-")]
    unknown = [a for a in extra if a not in late]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if late:
        args.overrides = [*overrides, *late]
    return args


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``covr-lightning`` command."""
    args = parse(argv)
    debug = getattr(args, "debug", False)
    # SIGTERM (e.g. a scheduler's kill) takes the same path as Ctrl-C: checkpoint, then exit.
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    try:
        return _command(args).run(args)
    except ConfigError as err:
        if debug:
            raise
        print(f"covr-lightning: error: {err.line()}", file=sys.stderr)
        return EXIT_CRASHED if isinstance(err, RunsFailed) and err.crashed else EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(
            "covr-lightning: interrupted; continue with --resume last if a checkpoint was written",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
