"""``covr-lightning fit --seeds 1,2,3``: one recipe, several seeds, one MLflow parent run.

Every seed is an ordinary fit: :func:`covr_lightning.commands.fit.fit` in this process, or the
``fit`` command in a subprocess.

Each seed S is an ordinary fit with ``run.seed=S`` and ``run.name=<name>-seedS`` (run directory
``<run.dir>/<experiment>/<name>-seedS/``), logged as an MLflow child run (tag
``mlflow.parentRunId``) of one parent run named ``<name>`` (tag ``covr.sweep=true``; params: the
recipe's config with ``run.seed`` set to the seed list).

- ``--parallel 1`` (default): the seeds run one after another in this process, with the usual
  console output and progress bar under a header line per seed.
- ``--parallel N``: N seeds at a time, each a ``python -m covr_lightning fit`` subprocess in its
  own session (so Ctrl-C reaches the sweep, which stops each child with one SIGTERM: the child
  checkpoints as a single fit would). A child's whole output goes to ``<its run dir>/fit.log``
  and each line is echoed as ``seed S | line``; it gets ``cores // N`` torch threads
  (``OMP_NUM_THREADS``, unless already set) so the children do not oversubscribe the CPU.
- ``--launcher slurm`` (or ``submitit-local``): each seed a submitit job that runs the same
  subprocess (:mod:`covr_lightning.commands.cluster`); all at once unless ``--parallel N``.

A seed that fails does not stop the others. When all have ended, the parent logs the aggregate of
``eval/return`` over the finished seeds (see :func:`aggregate_metrics`) and the compare table
and plot as artifacts, then ends FINISHED, or FAILED naming the failed seeds (tag
``covr.failed_seeds``; the command then raises :class:`~covr_lightning.errors.RunsFailed`). ``<run.dir>/<experiment>/<name>/sweep.json`` records the sweep (parent
run id, each seed's status), so ``--resume last`` continues the same parent: finished seeds are
kept, the others resume from their last checkpoint (or start, if they have none).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from jsonargparse import Namespace
from rich.console import Console

from covr_lightning.commands.cluster import JobPool, Launcher, parse_launcher
from covr_lightning.commands.fit import fit, print_dry_run
from covr_lightning.commands.fit_process import cpu_count, fit_env
from covr_lightning.config import config_to_dict, load_recipe, run_directory
from covr_lightning.errors import EXIT_INTERRUPTED, EXIT_USER_ERROR, ConfigError, RunsFailed
from covr_lightning.loop.checkpoint import latest_checkpoint
from covr_lightning.loop.plan import plan_table
from covr_lightning.tracking.compare import DEFAULT_METRIC, write_comparison
from covr_lightning.tracking.curves import RunCurve, step_grid, values_at
from covr_lightning.tracking.mlflow import (
    SWEEP_TAG,
    MLflowTracker,
    finished_child_curves,
)
from covr_lightning.tracking.report import COMPARISON_FILES, print_table
from covr_lightning.tracking.stats import summarize

SWEEP_FILE = "sweep.json"
FAILED_SEEDS_TAG = "covr.failed_seeds"
NOTE_TAG = "mlflow.note.content"  # the run's description in the MLflow UI
STEP_STATS = ("n", "mean", "std", "median", "iqm")
"""Statistics across seeds the parent logs at each env step (see :func:`aggregate_metrics`)."""
FINAL_STATS = (*STEP_STATS, "iqm_ci_low", "iqm_ci_high")
"""... and at the final budget, with the IQM's bootstrap CI (``sweep/final/<metric>_<stat>``)."""

_SEED_PART = re.compile(r"(\d+)(?:\s*-\s*(\d+))?")


def parse_seeds(text: str) -> list[int]:
    """``"1,2,3"`` or ``"1-3"`` or ``"1-3,7"`` -> ``[1, 2, 3(, 7)]``.

    Raises:
        ConfigError: A part is not a non-negative integer or an ``a-b`` range with a <= b, or a
            seed repeats.
    """
    seeds: list[int] = []
    for part in text.split(","):
        match = _SEED_PART.fullmatch(part.strip())
        if match is None or (match[2] is not None and int(match[2]) < int(match[1])):
            raise ConfigError(
                f"--seeds {text!r}: {part.strip()!r} is not a seed or a range of seeds",
                "pass integers and ranges, e.g. --seeds 1,2,3 or --seeds 1-5",
            )
        low = int(match[1])
        seeds.extend(range(low, int(match[2] or low) + 1))
    if repeated := sorted({s for s in seeds if seeds.count(s) > 1}):
        raise ConfigError(f"--seeds {text!r} names seed {repeated[0]} twice", "name each seed once")
    return seeds


def seed_run_name(name: str, seed: int) -> str:
    """The run name of one seed of a sweep: ``<name>-seed<seed>`` (compare strips the suffix)."""
    return f"{name}-seed{seed}"


def aggregate_metrics(
    curves: list[RunCurve], metric: str = DEFAULT_METRIC
) -> dict[int, dict[str, float]]:
    """The parent's curves: ``env step -> {"sweep/<metric>_<stat>": value}``.

    At each env step any seed logged ``metric``, each seed contributes its value at its last
    logged step <= that step, within its own logged span (the rule of ``compare``'s curves);
    the statistics are :func:`~covr_lightning.tracking.compare.summarize`'s without the CI
    (n, mean, sample std, median, IQM).
    """
    points = {}
    for step in step_grid(curves):
        summary = summarize(values_at(curves, step), ci=False)
        points[int(step)] = {f"sweep/{metric}_{k}": float(summary[k]) for k in STEP_STATS}
    return points


@dataclass
class SeedRun:
    """One seed of a sweep and how it went (one entry of ``sweep.json``)."""

    seed: int
    run_name: str
    run_dir: str
    status: str = "PENDING"  # PENDING, RUNNING, FINISHED, FAILED, KILLED
    exit_code: int | None = None
    seconds: float = 0.0
    resume: bool = False
    job_id: str | None = None  # the submitit job of the last attempt (--launcher slurm, ...)


class Sweep:
    """Runs the seeds of one recipe under one MLflow parent run.

    Args:
        recipe: Packaged recipe name or path, as given to ``fit --recipe``.
        overrides: ``dotted.key=value`` overrides shared by all seeds (never ``run.seed``).
        seeds: The seeds, in launch order.
        parallel: Seeds at a time; 1 runs them in this process (unless ``launcher`` is given).
        resume: ``"last"`` continues the sweep recorded in ``sweep.json``; ``None`` starts one.
        debug: Show tracebacks of failed seeds.
        launcher: Run each seed as a submitit job (``--launcher slurm``); ``None``: this machine.
    """

    def __init__(
        self,
        recipe: str,
        overrides: list[str],
        seeds: list[int],
        parallel: int = 1,
        resume: str | None = None,
        debug: bool = False,
        launcher: Launcher | None = None,
    ) -> None:
        if parallel < 1:
            raise ConfigError(
                f"--parallel {parallel} is not a number of seeds at a time",
                "pass --parallel 1 (one after another) or more",
            )
        if any(item.partition("=")[0].strip() == "run.seed" for item in overrides):
            raise ConfigError(
                "--seeds and a run.seed= override both set the seed",
                "drop run.seed=... and list the seeds in --seeds",
            )
        if resume not in (None, "last"):
            raise ConfigError(
                f"--resume {resume} with --seeds: a sweep resumes all its seeds at once",
                "pass --resume last (each seed continues from its own last checkpoint)",
            )
        self.recipe, self.overrides, self.seeds = recipe, list(overrides), seeds
        self.parallel, self.resume, self.debug = parallel, resume, debug
        self.launcher = launcher
        self.cfg: Namespace = load_recipe(recipe, overrides)  # validates the shared overrides
        self.name = self.cfg.run.name
        self.sweep_dir = run_directory(self.cfg)
        self.runs = [
            SeedRun(
                s,
                seed_run_name(self.name, s),
                str(self.sweep_dir.parent / seed_run_name(self.name, s)),
            )
            for s in seeds
        ]
        self.tracker = MLflowTracker(
            self.cfg.tracking.experiment, self.cfg.tracking.uri, self.cfg.tracking.enabled
        )
        self.parent_run_id: str | None = None
        self._print_lock = threading.Lock()

    @property
    def sweep_file(self) -> Path:
        return self.sweep_dir / SWEEP_FILE

    def child_overrides(self, run: SeedRun) -> list[str]:
        return [*self.overrides, f"run.seed={run.seed}", f"run.name={run.run_name}"]

    # ------------------------------------------------------------------ plan and state

    def plan(self):
        """The training plan of one seed plus the sweep's rows (a rich Table)."""
        table = plan_table(self.cfg, self.sweep_dir.parent / f"{self.name}-seed<S>")
        how = "one after another" if self.parallel == 1 else f"{self.parallel} at a time"
        if self.launcher is not None:
            how = "all at once" if self.parallel >= len(self.seeds) else how
            how += f", one {self.launcher.name} job each"
        table.add_row("seeds", f"{', '.join(map(str, self.seeds))} ({how})")
        if self.launcher is not None:
            table.add_row("launcher", self.launcher.describe())
            table.add_row("job logs", str(self.sweep_dir / "submitit"))
        table.add_row("sweep record", str(self.sweep_file))
        return table

    def _prepare(self) -> None:
        """Check the run directories and load the recorded sweep when resuming.

        Raises:
            ConfigError: A fresh sweep would overwrite a sweep or a seed's run, a resumed one has
                no record or other seeds, or the directory is not writable.
        """
        try:
            self.sweep_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ConfigError(
                f"cannot write the run directory {self.sweep_dir} ({err.strerror or err})",
                "set run.dir to a writable folder",
            ) from err
        if self.resume is None:
            if self.sweep_file.is_file():
                raise ConfigError(
                    f"{self.sweep_dir} already holds a sweep ({SWEEP_FILE})",
                    "continue it with --resume last, or start a new one with run.name=NEW",
                )
            for run in self.runs:
                if latest_checkpoint(Path(run.run_dir)) is not None:
                    raise ConfigError(
                        f"{run.run_dir} already holds a run with checkpoints",
                        "start the sweep under a new name with run.name=NEW",
                    )
            return
        if not self.sweep_file.is_file():
            raise ConfigError(
                f"no sweep to resume in {self.sweep_dir} (no {SWEEP_FILE})",
                "start it without --resume, or pass the run.name it was started with",
            )
        recorded = json.loads(self.sweep_file.read_text())
        if recorded["seeds"] != self.seeds:
            raise ConfigError(
                f"the sweep in {self.sweep_dir} ran seeds "
                f"{','.join(map(str, recorded['seeds']))}, not {','.join(map(str, self.seeds))}",
                f"resume with --seeds {','.join(map(str, recorded['seeds']))}, or start a new "
                "sweep with run.name=NEW",
            )
        self.parent_run_id = recorded.get("parent_run_id")
        previous = {r["seed"]: r for r in recorded["runs"]}
        for run in self.runs:
            if previous.get(run.seed, {}).get("status") == "FINISHED":
                run.status, run.exit_code = "FINISHED", 0
                run.seconds = previous[run.seed].get("seconds", 0.0)
                run.job_id = previous[run.seed].get("job_id")
            else:
                run.resume = latest_checkpoint(Path(run.run_dir)) is not None

    def _save(self, status: str) -> None:
        record = {
            "recipe": self.recipe,
            "overrides": self.overrides,
            "seeds": self.seeds,
            "status": status,
            "launcher": self.launcher.name if self.launcher is not None else "local",
            "experiment": self.tracker.experiment,
            "tracking_uri": self.tracker.uri if self.tracker.enabled else None,
            "parent_run_id": self.parent_run_id,
            "runs": [asdict(r) for r in self.runs],
        }
        tmp = self.sweep_file.with_name(f".{SWEEP_FILE}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(record, indent=2) + "\n")
        os.replace(tmp, self.sweep_file)

    def _open_parent(self) -> None:
        config = config_to_dict(self.cfg)
        config["run"]["seed"] = ",".join(map(str, self.seeds))
        self.parent_run_id = self.tracker.start(
            run_name=self.name,
            config=config,
            config_file=None,
            run_id=self.parent_run_id,
            tags={
                SWEEP_TAG: "true",
                "covr.seeds": ",".join(map(str, self.seeds)),
                "run_dir": str(self.sweep_dir.resolve()),
            },
        )

    # ------------------------------------------------------------------ running the seeds

    def run(self) -> None:
        """Run every seed not finished yet, aggregate, close the parent.

        Raises:
            ConfigError: Before any seed runs (see :meth:`_prepare`), or the store cannot be opened.
            RunsFailed: Some seeds did not finish (the others ran, and the parent aggregates them).
            KeyboardInterrupt: Ctrl-C or SIGTERM; running seeds checkpoint, the parent is KILLED.
        """
        self._prepare()
        pool = None
        if self.launcher is not None:  # before the parent run: submitit may refuse a parameter
            pool = JobPool(self.launcher, self.sweep_dir / "submitit", self._log)
        Console(stderr=True).print(self.plan())
        self._open_parent()
        status = "FAILED"
        self._save("RUNNING")
        try:
            todo = [r for r in self.runs if r.status != "FINISHED"]
            if pool is not None:
                self._run_jobs(pool, todo)
            elif self.parallel == 1:
                for index, run in enumerate(todo):
                    self._run_in_process(run, index, len(todo))
            else:
                self._run_subprocesses(todo)
            failed = [r for r in self.runs if r.status != "FINISHED"]
            rows = self._aggregate()
            if failed:
                self._note_failures(failed)
            else:
                status = "FINISHED"
                self.tracker.delete_tags([FAILED_SEEDS_TAG, NOTE_TAG])  # from an earlier attempt
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            self._save(status)
            self.tracker.log_artifact(self.sweep_file)
            self.tracker.finish(status)
        self._report(rows)
        if failed:
            seeds = ",".join(str(r.seed) for r in failed)
            logs = "" if self.parallel == 1 and pool is None else " (see each seed's fit.log)"
            raise RunsFailed(
                f"seed{'s' if len(failed) > 1 else ''} {seeds} of sweep {self.name} did not "
                f"finish{logs}",
                "see the errors above, then continue with the same command plus --resume last",
                crashed=any(r.exit_code != EXIT_USER_ERROR for r in failed),
            )

    def _log(self, message: str) -> None:
        with self._print_lock:
            print(message, file=sys.stderr, flush=True)

    def _ended(self, run: SeedRun, exit_code: int, started: float) -> None:
        run.exit_code, run.seconds = exit_code, round(time.perf_counter() - started, 1)
        run.status = {0: "FINISHED", EXIT_INTERRUPTED: "KILLED"}.get(exit_code, "FAILED")
        self._save("RUNNING")
        self._log(
            f"seed {run.seed}: {run.status.lower()} after {_duration(run.seconds)}"
            + ("" if exit_code == 0 else f" (exit {exit_code})")
        )

    def _run_in_process(self, run: SeedRun, index: int, count: int) -> None:
        action = "resuming" if run.resume else "starting"
        Console(stderr=True).rule(f"seed {run.seed} ({index + 1}/{count}): {action} {run.run_dir}")
        started, code = time.perf_counter(), 0
        run.status = "RUNNING"
        self._save("RUNNING")
        try:
            fit(
                load_recipe(self.recipe, self.child_overrides(run)),
                resume="last" if run.resume else None,
                parent_run_id=self.parent_run_id,
                show_plan=False,
            )
        except KeyboardInterrupt:
            self._ended(run, EXIT_INTERRUPTED, started)
            raise
        except ConfigError as err:
            if self.debug:
                traceback.print_exc()
            self._log(f"seed {run.seed} stopped: {err.line()}")
            code = EXIT_USER_ERROR
        except Exception:  # a crash of one seed must not stop the others: show it, go on
            traceback.print_exc()
            code = 1
        gc.collect()  # free the seed's replay and models before the next seed builds its own
        self._ended(run, code, started)

    def _command(self, run: SeedRun) -> list[str]:
        command = [sys.executable, "-m", "covr_lightning", "fit", "--recipe", self.recipe]
        command += self.child_overrides(run)
        if self.parent_run_id:
            command += ["--parent-run-id", self.parent_run_id]
        if run.resume:
            command += ["--resume", "last"]
        if self.debug:
            command.append("--debug")
        return command

    def _child_env(self) -> dict[str, str]:
        return fit_env(os.environ, cpu_count() // self.parallel)

    def _echo(self, run: SeedRun, stream, log_file) -> None:
        for line in stream:
            log_file.write(line)
            log_file.flush()
            self._log(f"seed {run.seed} | {line.rstrip()}")

    def _run_subprocesses(self, todo: list[SeedRun]) -> None:
        pending, env = deque(todo), self._child_env()
        running: dict[subprocess.Popen, tuple[SeedRun, float, threading.Thread, Any]] = {}
        try:
            while pending or running:
                while pending and len(running) < self.parallel:
                    run = pending.popleft()
                    Path(run.run_dir).mkdir(parents=True, exist_ok=True)
                    log_file = (Path(run.run_dir) / "fit.log").open("a")
                    proc = subprocess.Popen(
                        self._command(run),
                        stdout=subprocess.PIPE,
                        stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL,
                        text=True,
                        env=env,
                        start_new_session=True,  # Ctrl-C reaches the sweep, which stops children
                    )
                    echo = threading.Thread(
                        target=self._echo, args=(run, proc.stdout, log_file), daemon=True
                    )
                    echo.start()
                    run.status = "RUNNING"
                    running[proc] = (run, time.perf_counter(), echo, log_file)
                    self._save("RUNNING")
                    action = "resuming" if run.resume else "starting"
                    self._log(
                        f"seed {run.seed}: {action} (pid {proc.pid}, log {run.run_dir}/fit.log)"
                    )
                time.sleep(0.2)
                for proc in [p for p in running if p.poll() is not None]:
                    self._reap(proc, running.pop(proc))
        except KeyboardInterrupt:
            self._log("interrupted: stopping the running seeds (each writes a checkpoint)")
            for proc in running:
                proc.send_signal(signal.SIGTERM)
            for proc, entry in running.items():
                proc.wait()
                self._reap(proc, entry)
            raise

    def _reap(self, proc: subprocess.Popen, entry) -> None:
        run, started, echo, log_file = entry
        echo.join()
        log_file.close()
        code = proc.returncode  # -N: killed by signal N (e.g. the OOM killer), shown as 128 + N
        self._ended(run, code if code >= 0 else 128 - code, started)

    def _run_jobs(self, pool: JobPool, todo: list[SeedRun]) -> None:
        """Each seed as a submitit job running the command of a ``--parallel`` child."""
        runs = {run.seed: run for run in todo}
        started: dict[int, float] = {}

        def submitted(seed: int, job_id: str) -> None:
            runs[seed].status, runs[seed].job_id = "RUNNING", job_id
            started[seed] = time.perf_counter()
            self._save("RUNNING")

        def ended(seed: int, exit_code: int) -> None:
            self._ended(runs[seed], exit_code, started.get(seed, time.perf_counter()))

        jobs = [pool.job(r.seed, self._command(r), r.run_dir, r.resume) for r in todo]
        pool.run(jobs, self.parallel, submitted, ended)

    # ------------------------------------------------------------------ the parent's aggregate

    def _children(self) -> list[RunCurve]:
        """The latest finished MLflow child run of each finished seed, as ``eval/return`` curves."""
        finished = [r.run_name for r in self.runs if r.status == "FINISHED"]
        return finished_child_curves(
            self.tracker.uri, self.tracker.experiment, self.parent_run_id, finished, DEFAULT_METRIC
        )

    def _aggregate(self) -> list[dict[str, Any]] | None:
        """Log the across-seed statistics and the comparison on the parent; the table's rows."""
        if not self.tracker.enabled or self.parent_run_id is None:
            return None
        curves = self._children()
        if not curves:
            return None
        for step, metrics in aggregate_metrics(curves).items():
            self.tracker.log_metrics(metrics, step=step)
        out = self.sweep_dir / "comparison"
        title = f"{self.tracker.experiment} / {self.name}: {DEFAULT_METRIC} across seeds"
        rows = write_comparison(curves, ["run.name"], [], out, title)
        final = rows[0]  # one group (the seeds' names differ only by -seedS), point "final"
        self.tracker.log_metrics(
            {f"sweep/final/{DEFAULT_METRIC}_{k}": float(final[k]) for k in FINAL_STATS},
            step=max(int(c.steps[-1]) for c in curves),
        )
        for name in COMPARISON_FILES:
            self.tracker.log_artifact(out / name, "comparison")
        self.tracker.set_tags(
            {
                "covr.finished_seeds": ",".join(
                    str(r.seed) for r in self.runs if r.status == "FINISHED"
                )
            }
        )
        return rows

    def _note_failures(self, failed: list[SeedRun]) -> None:
        seeds = ",".join(str(r.seed) for r in failed)
        self.tracker.set_tags(
            {
                FAILED_SEEDS_TAG: seeds,
                NOTE_TAG: "failed seeds: "
                + "; ".join(f"{r.seed} ({r.status.lower()}, exit {r.exit_code})" for r in failed),
            }
        )

    def _report(self, rows: list[dict[str, Any]] | None) -> None:
        for run in self.runs:
            self._log(
                f"seed {run.seed:>4}  {run.status:<8}  {_duration(run.seconds):>8}  {run.run_dir}"
            )
        if rows is not None:
            print_table(rows, ["run.name"], f"{self.name}: {DEFAULT_METRIC} across seeds")
            self._log(
                f"parent MLflow run {self.parent_run_id} ({self.tracker.uri}); comparison in "
                f"{self.sweep_dir / 'comparison'}"
            )


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def run(args: argparse.Namespace) -> int:
    """``fit --seeds``: the dry run (config and the sweep's plan) or the sweep."""
    launcher = parse_launcher(args.launcher, args.slurm)
    seeds = parse_seeds(args.seeds)
    default_parallel = 1 if launcher is None else len(seeds)  # jobs: let the scheduler queue them
    sweep = Sweep(
        args.recipe,
        args.overrides,
        seeds,
        default_parallel if args.parallel is None else args.parallel,
        args.resume,
        args.debug,
        launcher,
    )
    if args.dry_run:
        print_dry_run(sweep.cfg, plan=sweep.plan())
        return 0
    if launcher is not None:
        launcher.check_reachable()
    sweep.run()
    return 0
