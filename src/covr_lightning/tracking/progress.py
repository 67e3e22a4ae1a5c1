"""The progress bar and the console lines of a fit.

In a terminal a live bar shows env steps, env steps/s, the last episode return and the last
evaluation; elsewhere (CI logs, pipes) the bar stays quiet and the same facts come as plain lines
at each evaluation and checkpoint, so a log file still tells the story.
"""

from __future__ import annotations

import sys
import time

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class TrainingProgress:
    """Env-step progress with throughput and returns.

    Args:
        total_env_steps: Budget shown as the bar's total.
        start_env_steps: Where a resumed run starts.
        description: Left-hand label (the phase and round, once COVR uses it).
        console: Where to print; defaults to stderr so stdout stays clean for ``--dry-run``.
    """

    def __init__(
        self,
        total_env_steps: int,
        start_env_steps: int = 0,
        description: str = "train",
        console: Console | None = None,
    ) -> None:
        self.console = console or Console(stderr=True)
        self.live = self.console.is_terminal and sys.stderr.isatty()
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("env steps"),
            TextColumn("{task.fields[speed]:>6} steps/s"),
            TextColumn("return {task.fields[episode_return]}"),
            TextColumn("eval {task.fields[eval_return]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.console,
            disable=not self.live,
            refresh_per_second=4,
        )
        self._task = self._progress.add_task(
            description,
            total=total_env_steps,
            completed=start_env_steps,
            speed="-",
            episode_return="-",
            eval_return="-",
        )
        self._window_start = (time.perf_counter(), start_env_steps)
        self.env_steps_per_second = 0.0

    def __enter__(self) -> TrainingProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self._progress.stop()

    def update(self, env_steps: int, description: str | None = None) -> None:
        """Move the bar to ``env_steps``; the speed is averaged over the last few seconds."""
        now = time.perf_counter()
        start_time, start_steps = self._window_start
        if now - start_time >= 2.0:
            self.env_steps_per_second = (env_steps - start_steps) / (now - start_time)
            self._window_start = (now, env_steps)
        fields = {"speed": f"{self.env_steps_per_second:.0f}"}
        if description is not None:
            fields["description"] = description
        self._progress.update(self._task, completed=env_steps, **fields)

    def set_description(self, description: str) -> None:
        """Change the left-hand label (COVR: the round and phase); logged as a line too."""
        self._progress.update(self._task, description=description)
        if not self.live:
            self.log(description)

    def episode(self, episode_return: float) -> None:
        """Show the return of the episode that just ended."""
        self._progress.update(self._task, episode_return=f"{episode_return:.1f}")

    def evaluation(self, env_steps: int, mean_return: float, std_return: float) -> None:
        """Show an evaluation result on the bar and as a line."""
        self._progress.update(self._task, eval_return=f"{mean_return:.1f}")
        speed = self.env_steps_per_second
        self.log(
            f"env step {env_steps:>9,}  eval return {mean_return:8.1f} ± {std_return:.1f}"
            + (f"  ({speed:.0f} env steps/s)" if speed > 0 else "")
        )

    def log(self, message: str) -> None:
        """Print a line above the bar (or plainly when there is no live bar)."""
        self.console.print(message, highlight=False, soft_wrap=True)
