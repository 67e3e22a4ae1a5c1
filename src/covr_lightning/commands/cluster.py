"""``fit --seeds ... --launcher slurm|submitit-local``: each seed of a sweep as a submitit job.

The sweep (:mod:`covr_lightning.commands.sweep`) keeps the MLflow parent run and ``sweep.json``;
this module hands each seed's fit to submitit and reports back when it ends.

- :func:`parse_launcher` reads ``--launcher`` and the ``--slurm KEY=VALUE`` executor parameters,
  checked against submitit's own lists before anything runs.
- :class:`JobPool` submits one :class:`~covr_lightning.commands.seed_job.SeedJob` per seed (at
  most ``--parallel`` at a time), prints one line per job state change, and on Ctrl-C asks the
  running jobs to checkpoint and stop (a file in the submitit folder, which every job polls), then
  cancels what is left on a second Ctrl-C.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from types import ModuleType
from typing import Any

from covr_lightning.commands.fit_process import cpu_count
from covr_lightning.commands.seed_job import SeedJob
from covr_lightning.errors import EXIT_CRASHED, EXIT_INTERRUPTED, EXIT_USER_ERROR, ConfigError

LAUNCHERS = ("local", "submitit-local", "slurm")
"""``--launcher``: ``local`` runs seeds in this process or ``--parallel`` subprocesses (no submitit);
``slurm`` submits one SLURM job per seed; ``submitit-local`` runs the same jobs as local processes
through submitit's local executor (to test the cluster path on one machine)."""
DEFAULT_TIMEOUT_MIN = 24 * 60
"""A job's time limit unless ``--slurm timeout_min=`` says otherwise (submitit's own is 5 min)."""
DEFAULT_MAX_NUM_TIMEOUT = 20
"""Time-outs after which a job is no longer requeued (submitit's own is 3: 3 x the limit)."""
STOP_FILE = "stop-requested"
"""Written into the submitit folder on Ctrl-C; every job polls it and stops its fit."""
POLL_S = 1.0
"""How often the sweep polls its jobs' states."""

_EXECUTORS = {"submitit-local": "local", "slurm": "slurm"}  # submitit's cluster names
_CONSTRUCTOR_KEYS = ("max_num_timeout",)  # AutoExecutor(...) arguments, not update_parameters
_ONE_PROCESS = ("nodes", "tasks_per_node", "ntasks_per_node")  # one fit, one task, one node
_SUBMITIT_LOG_VARIABLE = "SUBMITIT_LOG_LEVEL"  # read once, when submitit is first imported
_NOT_STARTED = ("PENDING", "REQUEUED", "CONFIGURING")  # SLURM states of a job that has not run yet


def _import_submitit(launcher: str) -> ModuleType:
    """submitit, or a one-line error naming the extra that installs it.

    submitit configures logging when first imported (``logging.config.dictConfig``), which closes
    every handler the process already has, the user's and absl's (dm_control's) included. The
    sweep's own process prints its job lines itself, so it imports submitit without that step
    (``SUBMITIT_LOG_LEVEL=NOCONFIG`` for the import only: the jobs it starts log as usual).
    """
    previous = os.environ.get(_SUBMITIT_LOG_VARIABLE)
    os.environ[_SUBMITIT_LOG_VARIABLE] = "NOCONFIG"
    try:
        import submitit
    except ImportError as err:
        raise ConfigError(
            f"--launcher {launcher} needs the submitit package, which is not installed",
            "pip install 'covr-lightning[cluster]'",
        ) from err
    finally:
        if previous is None:
            os.environ.pop(_SUBMITIT_LOG_VARIABLE, None)
        else:
            os.environ[_SUBMITIT_LOG_VARIABLE] = previous
    return submitit


def _value(key: str, text: str, expected: type | None) -> Any:
    """``--slurm KEY=TEXT``'s value: JSON lists/mappings, true/false, integers, else the text.

    Raises:
        ConfigError: The text is not valid JSON, or not of the type submitit expects for ``key``.
    """
    value: Any = text
    if expected is str:
        return text
    if text[:1] in ("[", "{"):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(
                f"--slurm {key}={text} is not valid JSON",
                "write lists and mappings as JSON, e.g. --slurm 'setup=[\"module load cuda\"]'",
            ) from err
    elif text.lower() in ("true", "false"):
        value = text.lower() == "true"
    elif re.fullmatch(r"-?\d+", text):
        value = int(text)
    elif expected is float:
        with contextlib.suppress(ValueError):  # not a number: refused below
            value = float(text)
    accepted = (int, float) if expected is float else expected
    if accepted is not None and (
        not isinstance(value, accepted) or (accepted is int and isinstance(value, bool))
    ):
        kind = {int: "an integer", float: "a number", bool: "true or false"}[expected]
        example = {"timeout_min": "240", "mem_gb": "64"}.get(
            key, "true" if expected is bool else "1"
        )
        raise ConfigError(
            f"--slurm {key}={text}: submitit takes {kind} for {key}",
            f"pass {kind}, e.g. --slurm {key}={example}",
        )
    return value


@dataclass(frozen=True)
class Launcher:
    """A cluster launcher and its submitit executor parameters.

    Attributes:
        name: ``"slurm"`` or ``"submitit-local"``.
        parameters: ``--slurm`` parameters by name: submitit's generic ones (``timeout_min``,
            ``gpus_per_node``, ``cpus_per_task``, ``mem_gb``, ...), SLURM's (``partition``,
            ``account``, ``qos``, ``signal_delay_s``, ``setup``, ...) and ``max_num_timeout``.
    """

    name: str
    parameters: dict[str, Any]

    @property
    def cluster(self) -> str:
        """submitit's name for the executor: ``"slurm"`` or ``"local"``."""
        return _EXECUTORS[self.name]

    @property
    def stop_wait_s(self) -> float:
        """How long a signalled job waits for its fit's checkpoint before killing it.

        The scheduler kills the job ``signal_delay_s`` after the signal (submitit's defaults: 90 s
        on SLURM, 30 s in its local executor, which cannot change it); the job must be done by
        then for submitit to requeue it.
        """
        delay = self.parameters.get("signal_delay_s", 90) if self.cluster == "slurm" else 30
        return max(5.0, float(delay) - 10.0)

    def describe(self) -> str:
        """One line for the plan: where the jobs run and with which parameters."""
        shown = {
            "timeout_min": DEFAULT_TIMEOUT_MIN,
            "max_num_timeout": DEFAULT_MAX_NUM_TIMEOUT,
            **self.parameters,
        }
        where = "SLURM jobs" if self.cluster == "slurm" else "local processes (submitit)"
        missing = "" if self.cluster == "local" or shutil.which("sbatch") else "; no sbatch here"
        return f"{self.name}: {where}; " + ", ".join(f"{k}={v}" for k, v in shown.items()) + missing

    def check_reachable(self) -> None:
        """Raise unless this machine can submit the jobs (SLURM's tools on ``PATH``).

        Raises:
            ConfigError: ``--launcher slurm`` without ``sbatch`` or ``srun`` on ``PATH``.
        """
        if self.cluster != "slurm":
            return
        for tool in ("sbatch", "srun"):
            if shutil.which(tool) is None:
                raise ConfigError(
                    f"--launcher slurm needs SLURM's {tool} on PATH, and this machine has none",
                    "run the sweep on a SLURM login node, or use --launcher submitit-local to test "
                    "the same jobs on this machine",
                )

    def executor(self, folder: Path) -> Any:
        """The submitit ``AutoExecutor`` writing its job files and logs into ``folder``.

        Raises:
            ConfigError: submitit refuses a parameter's value.
        """
        submitit = _import_submitit(self.name)
        max_num_timeout = self.parameters.get("max_num_timeout", DEFAULT_MAX_NUM_TIMEOUT)
        executor = submitit.AutoExecutor(
            folder=folder,
            cluster=self.cluster,
            **{f"{self.cluster}_max_num_timeout": max_num_timeout},
        )
        generic = submitit.AutoExecutor._typed_parameters()
        parameters: dict[str, Any] = {"timeout_min": DEFAULT_TIMEOUT_MIN}
        for key, value in self.parameters.items():
            if key not in _CONSTRUCTOR_KEYS:
                # Non-generic names are SLURM's; submitit's local executor ignores them, so
                # submitit-local runs the very command line meant for the cluster.
                parameters[key if key in generic else f"slurm_{key}"] = value
        try:
            executor.update_parameters(**parameters)
        except (ValueError, TypeError, NameError, AssertionError) as err:
            raise ConfigError(
                f"submitit refused the --slurm parameters: {str(err).splitlines()[0]}",
                "fix that --slurm value (docs/scaling.md lists the parameters)",
            ) from err
        return executor


def parse_launcher(name: str, items: Sequence[str]) -> Launcher | None:
    """``--launcher NAME`` and its ``--slurm KEY=VALUE`` items; ``None`` for ``local``.

    Raises:
        ConfigError: ``--slurm`` without a cluster launcher, submitit not installed, an item that
            is not ``KEY=VALUE``, a key submitit does not know, or a value of the wrong type.
    """
    if name not in LAUNCHERS:
        raise ConfigError(
            f"--launcher {name} is not a launcher", f"pass one of {', '.join(LAUNCHERS)}"
        )
    if name == "local":
        if items:
            raise ConfigError(
                f"--slurm {items[0]} without a cluster launcher",
                "add --launcher slurm (or --launcher submitit-local to test on this machine)",
            )
        return None
    submitit = _import_submitit(name)
    # submitit's own lists, the ones its update_parameters checks against.
    generic: dict[str, type] = submitit.AutoExecutor._typed_parameters()
    known = set(generic) | submitit.SlurmExecutor._valid_parameters() | set(_CONSTRUCTOR_KEYS)
    parameters: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise ConfigError(
                f"--slurm {item!r} is not KEY=VALUE", "pass e.g. --slurm partition=gpu"
            )
        if key not in known:
            raise ConfigError(
                f"--slurm {key}: submitit has no such parameter",
                f"use one of {', '.join(sorted(known))}",
            )
        expected = int if key in _CONSTRUCTOR_KEYS else generic.get(key)
        parameters[key] = _value(key, text.strip(), expected)
        if key in _ONE_PROCESS and parameters[key] != 1:
            # submitit would start the job's callable once per task: two fits in one run dir.
            raise ConfigError(
                f"--slurm {key}={text.strip()}: a seed's fit is one process on one node",
                f"drop {key} (a fit spreads over the GPUs of its node itself, e.g. covr.sft_devices)",
            )
    return Launcher(name, parameters)


@dataclass
class _Tracked:
    """A submitted job and the last state the sweep printed for it."""

    seed: int
    job: Any  # a submitit Job
    state: str = ""


class JobPool:
    """Submits a sweep's seed jobs through submitit and follows them to their end.

    Args:
        launcher: The cluster launcher and its parameters.
        folder: submitit's folder: job scripts, pickles and each job's ``<id>_0_log.out/err``.
        log: Prints one line to the user.

    Raises:
        ConfigError: submitit refuses a parameter.
    """

    def __init__(self, launcher: Launcher, folder: Path, log: Callable[[str], None]) -> None:
        self.launcher, self.folder, self.log = launcher, folder, log
        folder.mkdir(parents=True, exist_ok=True)
        self.stop_file = folder / STOP_FILE
        self.stop_file.unlink(missing_ok=True)  # an earlier attempt's Ctrl-C
        self.executor = launcher.executor(folder)

    def job(self, seed: int, command: list[str], run_dir: str, resume: bool) -> SeedJob:
        """The job of one seed: its fit ``command``, run from this process's working directory."""
        return SeedJob(
            seed,
            command,
            run_dir,
            os.getcwd(),
            str(self.stop_file),
            self.launcher.stop_wait_s,
            resume,
        )

    def run(
        self,
        jobs: Sequence[SeedJob],
        parallel: int,
        submitted: Callable[[int, str], None],
        ended: Callable[[int, int], None],
    ) -> None:
        """Run ``jobs``, at most ``parallel`` at a time, until each has ended.

        Args:
            jobs: One per seed, in launch order.
            parallel: Jobs submitted at a time (the scheduler may still queue them).
            submitted: Called with (seed, job id) when a job is submitted.
            ended: Called with (seed, exit code) when it ends: the fit's code, 1 for a job that
                ended without one (lost), 2 for one the scheduler refused, 130 for a stopped one.

        Raises:
            KeyboardInterrupt: Ctrl-C; the running jobs were stopped (each fit checkpoints) or,
                on a second Ctrl-C, cancelled, and all of them were reported to ``ended``.
        """
        if self.launcher.cluster == "local":
            # submitit-local's jobs share this machine: each fit gets its share of the cores, as
            # a --parallel child does (a SLURM job's fit uses the CPUs the job was allocated).
            jobs = [replace(job, threads=max(1, cpu_count() // parallel)) for job in jobs]
        pending, running = deque(jobs), {}
        try:
            while pending or running:
                while pending and len(running) < parallel:
                    tracked = self._submit(pending.popleft(), submitted, ended)
                    if tracked is not None:
                        running[tracked.seed] = tracked
                time.sleep(POLL_S)
                self._poll(running, ended, stopping=False)
        except KeyboardInterrupt:
            self._stop(running, ended)
            raise

    def _submit(
        self,
        job: SeedJob,
        submitted: Callable[[int, str], None],
        ended: Callable[[int, int], None],
    ) -> _Tracked | None:
        from submitit.core.utils import FailedJobError

        if "name" not in self.launcher.parameters:  # the seed's run name in squeue
            self.executor.update_parameters(name=Path(job.run_dir).name)
        try:
            handle = self.executor.submit(job)
        except (FailedJobError, OSError) as err:  # e.g. sbatch refused the partition or time
            self.log(f"seed {job.seed}: the job was refused: {str(err).strip().splitlines()[-1]}")
            ended(job.seed, EXIT_USER_ERROR)
            return None
        submitted(job.seed, str(handle.job_id))
        self.log(
            f"seed {job.seed}: submitted job {handle.job_id} ({self.launcher.name}), job log "
            f"{handle.paths.stdout}, fit output {job.run_dir}/fit.log"
        )
        return _Tracked(job.seed, handle)

    def _poll(
        self, running: dict[int, _Tracked], ended: Callable[[int, int], None], stopping: bool
    ) -> None:
        """Report ended jobs; print a line when a running job's state changes."""
        for seed, tracked in list(running.items()):
            if tracked.job.done():
                del running[seed]
                ended(seed, self._exit_code(tracked, stopping))
                continue
            state = tracked.job.state
            if state != tracked.state and state != "UNKNOWN":  # UNKNOWN: not in sacct yet
                tracked.state = state
                self.log(f"seed {seed}: job {tracked.job.job_id} {state}")

    def _exit_code(self, tracked: _Tracked, stopping: bool) -> int:
        from submitit.core.utils import FailedJobError, UncompletedJobError

        if (
            stopping
            and self.launcher.cluster == "local"
            and not tracked.job.paths.result_pickle.exists()
        ):
            # A local job killed by the terminal's Ctrl-C has no result, and no slow network file
            # system will bring one: do not wait submitit's 15 s for it.
            return EXIT_INTERRUPTED
        try:
            return int(tracked.job.result())
        except (UncompletedJobError, FailedJobError):
            if stopping:  # cancelled before it could report
                return EXIT_INTERRUPTED
            self.log(
                f"seed {tracked.seed}: job {tracked.job.job_id} ended without an exit code "
                f"(job lost: state {tracked.job.state}); see {tracked.job.paths.stdout}"
            )
            return EXIT_CRASHED

    def _stop(self, running: dict[int, _Tracked], ended: Callable[[int, int], None]) -> None:
        """Ask every running job to stop (its fit checkpoints); a second Ctrl-C cancels them."""
        self.log(
            "interrupted: asking the jobs to checkpoint and stop "
            "(Ctrl-C again cancels them at once)"
        )
        self.stop_file.touch()
        try:
            for tracked in running.values():
                # A job still queued has nothing to checkpoint: take it off the queue.
                if tracked.job.state in _NOT_STARTED:
                    tracked.job.cancel(check=False)
            while running:
                time.sleep(POLL_S)
                self._poll(running, ended, stopping=True)
        except KeyboardInterrupt:
            self.log("cancelling jobs " + ", ".join(str(t.job.job_id) for t in running.values()))
            for seed, tracked in list(running.items()):
                tracked.job.cancel(check=False)
                del running[seed]
                ended(seed, EXIT_INTERRUPTED)
