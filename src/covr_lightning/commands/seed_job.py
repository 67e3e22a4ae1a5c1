"""What a submitit job of a sweep runs: one seed's fit as a subprocess, checkpointable.

:class:`SeedJob` runs the ``python -m covr_lightning fit ...`` command of a local ``--parallel``
child (the sweep builds it) with its output in ``<run dir>/fit.log``, and implements submitit's
``checkpoint()`` protocol: on the pre-emption / time-out signal it stops the fit (which writes a
checkpoint) and returns itself with ``--resume last``, which submitit requeues. It is unpickled in
the job's process, so this module imports little (torch only when it looks for a checkpoint).

Signals, and why the fit gets them as it does:

- The fit ignores submitit's pre-emption signal (``USR2`` unless ``SUBMITIT_PREEMPT_SIGNAL`` says
  otherwise): SLURM sends it to every process of the job, and its default action would kill the
  fit without a checkpoint. The job process handles it (submitit calls :meth:`SeedJob.checkpoint`).
- The fit stops cleanly on one SIGTERM; a second one stops it at once. SLURM's pre-emption and
  ``scancel`` SIGTERM every process of the job, the fit included, so a job on SLURM notes that
  SIGTERM and sends none of its own. Outside SLURM the fit runs in a session of its own, so a
  terminal's Ctrl-C (which submitit-local's processes share with the sweep) reaches it only once,
  through its job.
"""

from __future__ import annotations

import functools
import os
import shlex
import signal
import subprocess
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import FrameType
from typing import Any

from covr_lightning.commands.fit_process import cpu_count, fit_env
from covr_lightning.errors import EXIT_INTERRUPTED

POLL_S = 1.0
"""How often a job looks at its fit and at the sweep's stop file."""


def _preemption_signal() -> signal.Signals:
    """submitit's pre-emption / time-out signal (``SIGUSR2`` by default)."""
    import submitit

    return getattr(signal, f"SIG{submitit.JobEnvironment.USR_SIG}")


@dataclass
class SeedJob:
    """What submitit runs for one seed: the seed's fit as a subprocess, checkpointable.

    Attributes:
        seed: The seed (for messages).
        command: The fit's command line, the one a local ``--parallel`` child runs.
        run_dir: The seed's run directory (its ``fit.log`` and checkpoints).
        cwd: The sweep's working directory: a relative ``run.dir``, recipe path or MLflow store
            means the same there.
        stop_file: Exists once the sweep has asked its jobs to stop.
        stop_wait_s: How long to wait for the fit's checkpoint after the pre-emption signal.
        resume: Continue the run from its last checkpoint (``--resume last``).
        threads: torch threads of the fit; ``None``: the CPUs the job may use (on SLURM, those
            it was allocated).
    """

    seed: int
    command: list[str]
    run_dir: str
    cwd: str
    stop_file: str
    stop_wait_s: float
    resume: bool = False
    threads: int | None = None
    _proc: subprocess.Popen | None = field(default=None, init=False, repr=False, compare=False)
    _stopping: bool = field(default=False, init=False, repr=False, compare=False)

    def __getstate__(self) -> dict[str, Any]:
        # submitit pickles the job (at submission and at checkpoint); a process is not state.
        return {**self.__dict__, "_proc": None, "_stopping": False}

    def _say(self, message: str) -> None:
        print(f"seed {self.seed}: {message}", flush=True)  # into the job's submitit log

    def _argv(self) -> list[str]:
        """The command, with ``--resume last`` once the run has a checkpoint.

        A job that SLURM itself requeues (a node failure, pre-emption in requeue mode) restarts
        from the pickle of its submission; it must continue the run, not refuse to overwrite it.
        """
        if "--resume" in self.command:
            return list(self.command)
        return [*self.command, "--resume", "last"] if self._resumes() else list(self.command)

    def _resumes(self) -> bool:
        """Whether the fit continues its run: asked to, or the run already has a checkpoint."""
        if self.resume:
            return True
        # Imported here: torch comes with it, and a job needs it only for this check.
        from covr_lightning.loop.checkpoint import latest_checkpoint

        return latest_checkpoint(Path(self.run_dir)) is not None

    def __call__(self) -> int:
        """Run the fit to its end; returns its exit code (0 finished, 130 stopped, 2 user error).

        Raises:
            KeyboardInterrupt: submitit-local cancelled the job (the fit was asked to stop).
        """
        if Path(self.stop_file).exists():
            self._say("the sweep was stopped before this job started")
            return EXIT_INTERRUPTED
        on_slurm = os.environ.get("SUBMITIT_EXECUTOR") == "slurm"
        if on_slurm:  # SLURM's SIGTERM reached the fit too (module docstring): send no second one
            signal.signal(signal.SIGTERM, self._on_scheduler_sigterm)
        argv = self._argv()
        log_path = Path(self.run_dir) / "fit.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._say(f"{shlex.join(argv)}\n  output: {log_path}")
        with log_path.open("a") as log:
            self._proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.cwd,
                env=fit_env(os.environ, self.threads or cpu_count()),
                start_new_session=not on_slurm,
                preexec_fn=functools.partial(signal.signal, _preemption_signal(), signal.SIG_IGN),
            )
        try:
            while self._proc.poll() is None:
                if Path(self.stop_file).exists():
                    self._stop("the sweep asked its jobs to stop")
                time.sleep(POLL_S)
        except KeyboardInterrupt:  # submitit-local's cancel; this process is killed next
            self._stop("the job was cancelled")
            raise
        code = self._proc.returncode
        self._say(f"the fit exited with code {code}")
        return code if code >= 0 else 128 - code  # -N: killed by signal N

    def _stop(self, reason: str) -> None:
        """Ask the fit to checkpoint and exit: one SIGTERM, never a second."""
        if self._stopping or self._proc is None or self._proc.poll() is not None:
            return
        self._stopping = True
        self._say(f"{reason}: stopping the fit (it writes a checkpoint)")
        self._proc.send_signal(signal.SIGTERM)

    def _on_scheduler_sigterm(self, signum: int, frame: FrameType | None) -> None:
        self._stopping = True
        self._say("SLURM sent SIGTERM to the job; the fit writes a checkpoint")

    def checkpoint(self) -> Any:
        """submitit's hook on pre-emption or time-out: stop the fit, then requeue with resume.

        The fit writes a checkpoint and exits; if it has not within :attr:`stop_wait_s` it is
        killed, and its previous checkpoint (written atomically) is the one resumed.

        Returns:
            A ``submitit.helpers.DelayedSubmission`` of this job with ``--resume last`` once the
            run has a checkpoint, which submitit requeues.
        """
        import submitit

        proc = self._proc
        if proc is not None and proc.poll() is None:
            self._stop("pre-empted or timed out")
            try:
                proc.wait(timeout=self.stop_wait_s)
            except subprocess.TimeoutExpired:
                self._say(f"no checkpoint after {self.stop_wait_s:.0f} s; killing the fit")
                proc.kill()
                proc.wait()
        resume = self._resumes()
        self._say(
            "the requeued job " + ("resumes from the last checkpoint" if resume else "starts over")
        )
        return submitit.helpers.DelayedSubmission(replace(self, resume=resume))
