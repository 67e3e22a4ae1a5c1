"""COVR's progressive round schedule, in env steps.

Round c lasts psi_c env steps. The paper's rule (``growth: factorial``) is

    psi_{c+1} = psi_c + psi_c * c        ->  psi_0, psi_0, 2 psi_0, 6 psi_0, 24 psi_0, ...

(the paper calls it "linear"; the formula grows factorially and is what we implement);
``growth: linear`` is psi_c = psi_0 * (c + 1). Rounds are laid end to end from env step 0 and the
last one is cut at the budget. Every round collects D_f; every round that ends before the budget is
followed by a VLM fine-tune (one after the final round would never be used). The lambda term is on
from round ``cold_start_rounds`` onward, so the VLM has been fine-tuned that many times before it
first guides.

With psi_0 = 5000, factorial growth, cold start 4 and 100k env steps: rounds end at 5k, 10k, 20k,
50k and 100k; four fine-tunes; guidance on for the last round (50k-100k).

Boundaries are env steps; the loop reaches a boundary at the first agent step at or past it, so a
round may run up to ``action_repeat - 1`` env steps long.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from rich.table import Table

Growth = Literal["factorial", "linear"]


@dataclass(frozen=True)
class Round:
    """One COVR round: RL (optionally guided) from ``start`` to ``end``, then maybe a fine-tune."""

    index: int
    start: int
    end: int
    guided: bool
    fine_tune: bool

    @property
    def length(self) -> int:
        """Env steps in the round."""
        return self.end - self.start


def round_lengths(psi_0: int, growth: Growth = "factorial", count: int = 8) -> list[int]:
    """psi_0 .. psi_{count-1} under the growth rule."""
    if psi_0 <= 0:
        raise ValueError(f"psi_0 must be > 0, got {psi_0}")
    if growth not in ("factorial", "linear"):
        raise ValueError(f"unknown growth {growth!r}; use factorial or linear")
    lengths = [psi_0]
    for c in range(count - 1):
        if growth == "factorial":
            lengths.append(lengths[c] + lengths[c] * c)  # psi_{c+1} = psi_c + psi_c * c
        else:
            lengths.append(psi_0 * (c + 2))  # psi_{c+1} = psi_0 * (c + 2)
    return lengths


def plan_rounds(
    total_env_steps: int, psi_0: int, growth: Growth = "factorial", cold_start_rounds: int = 4
) -> list[Round]:
    """The rounds covering ``[0, total_env_steps)``.

    Args:
        total_env_steps: Training budget.
        psi_0: Length of round 0 in env steps.
        growth: ``factorial`` (the paper's rule) or ``linear``.
        cold_start_rounds: Rounds without the lambda term at the start (DMC 4, CARLA 2).

    Returns:
        Rounds in order; the last ends at ``total_env_steps``.
    """
    if total_env_steps <= 0:
        raise ValueError(f"total_env_steps must be > 0, got {total_env_steps}")
    if cold_start_rounds < 0:
        raise ValueError(f"cold_start_rounds must be >= 0, got {cold_start_rounds}")
    rounds, start, c = [], 0, 0
    lengths = round_lengths(psi_0, growth)
    while start < total_env_steps:
        if c >= len(lengths):
            lengths = round_lengths(psi_0, growth, count=2 * len(lengths))
        end = min(start + lengths[c], total_env_steps)
        rounds.append(Round(c, start, end, c >= cold_start_rounds, end < total_env_steps))
        start, c = end, c + 1
    return rounds


def round_at(rounds: list[Round], env_step: int) -> Round:
    """The round that ``env_step`` falls in (the last one at or past the budget)."""
    for item in rounds:
        if env_step < item.end:
            return item
    return rounds[-1]


def schedule_table(rounds: list[Round], action_repeat: int | None = None) -> Table:
    """The plan as a table: round, env steps, guidance, fine-tune."""
    table = Table(title="COVR rounds", title_justify="left")
    table.add_column("round", justify="right")
    table.add_column("env steps", justify="right")
    if action_repeat:
        table.add_column("agent steps", justify="right")
    table.add_column("guidance (lambda)")
    table.add_column("VLM fine-tune after")
    for item in rounds:
        cells = [str(item.index), f"{item.start:,} - {item.end:,}"]
        if action_repeat:
            cells.append(f"{item.length // action_repeat:,}")
        cells += ["on" if item.guided else "off (cold start)", "yes" if item.fine_tune else "no"]
        table.add_row(*cells)
    return table
