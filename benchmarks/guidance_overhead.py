"""Print what guidance costs the agent: the wall time of a guided RL round against the same round unguided.

    python benchmarks/guidance_overhead.py                      # quickstart, tiny VLM, round 1
    python benchmarks/guidance_overhead.py --settings async-10,sync-10 --repeats 2
    python benchmarks/guidance_overhead.py --recipe dmc_cheetah --round 4 replay.batch_size=128

Each setting runs the recipe (MLflow off, checkpoints in a temporary folder) up to the end of RL
round ``--round`` and times that round's RL phase (agent steps, updates, guide queries, and for
the asynchronous guide the wait for its last answers). Settings:
  unguided    covr.cold_start_rounds beyond the last round: the same schedule, renders and D_f
              rows, no guide query (the reference)
  async-N     guidance from round ``--round`` on, covr.guide_async=true, covr.guide_every=N
  sync-N      the same with covr.guide_async=false (each query waits for its answer)
Guided settings use covr.cold_start_rounds=--round, so the rounds before it are identical.
Printed per setting: RL round seconds, ratio to unguided, guide ms per frame, frames per guide
call, answer lag in env steps, share of sampled rows still waiting, and agent stall per step.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

from rich.console import Console
from rich.table import Table

from covr_lightning.build import build_loop
from covr_lightning.config import load_recipe


class _RoundDone(Exception):
    """Raised from the tracker once the measured round's RL time is logged."""


def run_setting(recipe: str, overrides: list[str], round_index: int) -> dict[str, float]:
    """RL seconds of round ``round_index`` and the guide metrics logged during it."""
    with tempfile.TemporaryDirectory() as folder:
        cfg = load_recipe(
            recipe, [*overrides, f"run.dir={folder}", "tracking.enabled=false", "run.name=bench"]
        )
        loop = build_loop(cfg)
        seen: dict[str, list[float]] = {}
        log_metrics = loop.tracker.log_metrics
        start = [0.0]

        def spy(metrics, step):
            # schedule/round opens a round; time/rl_phase_s closes its RL phase.
            if metrics.get("schedule/round") == round_index:
                start[0] = time.perf_counter()
                seen.clear()
            for key, value in metrics.items():
                seen.setdefault(key, []).append(float(value))
            if "time/rl_phase_s" in metrics and seen.get("schedule/round") == [round_index]:
                raise _RoundDone
            return log_metrics(metrics, step=step)

        loop.tracker.log_metrics = spy
        try:
            loop.fit()
            raise RuntimeError(f"round {round_index} never ran: the recipe has fewer rounds")
        except _RoundDone:
            pass
        finally:
            loop.close()
        result = {"seconds": seen["time/rl_phase_s"][-1]}
        for key in [
            "guide/query_ms",
            "guide/batch_frames",
            "guide/lag_env_steps",
            "guide/prior_waiting_frac",
            "guide/stall_ms",
        ]:
            if key in seen:
                result[key] = statistics.fmean(seen[key])
        return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipe", default="quickstart")
    parser.add_argument("--round", type=int, default=1, help="the RL round to time (1)")
    parser.add_argument("--settings", default="unguided,async-10,sync-10,async-1,sync-1")
    parser.add_argument("--repeats", type=int, default=1, help="passes over the settings (1)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = parser.parse_args()
    settings = args.settings.split(",")
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in settings}
    for repeat in range(args.repeats):  # A B A B: drift of the machine hits every setting alike
        for name in settings:
            if name == "unguided":
                extra = ["covr.cold_start_rounds=1000"]
            else:
                mode, every = name.split("-")
                extra = [
                    f"covr.cold_start_rounds={args.round}",
                    f"covr.guide_async={'true' if mode == 'async' else 'false'}",
                    f"covr.guide_every={every}",
                ]
            result = run_setting(args.recipe, [*args.overrides, *extra], args.round)
            runs[name].append(result)
            Console(stderr=True).log(f"pass {repeat + 1} {name}: {result}")

    table = Table(title=f"{args.recipe}: RL round {args.round}, wall time guided vs unguided")
    for column in [
        "setting", "round s", "x unguided", "guide ms/frame", "frames/call", "lag env steps",
        "waiting rows", "stall ms/step",
    ]:  # fmt: skip
        table.add_column(column, justify="right" if column != "setting" else "left")
    base = statistics.fmean(r["seconds"] for r in runs["unguided"]) if "unguided" in runs else None

    def mean(name: str, key: str, fmt: str) -> str:
        values = [r[key] for r in runs[name] if key in r]
        return format(statistics.fmean(values), fmt) if values else "-"

    for name in settings:
        seconds = statistics.fmean(r["seconds"] for r in runs[name])
        table.add_row(
            name,
            " / ".join(f"{r['seconds']:.1f}" for r in runs[name]),
            f"{seconds / base:.2f}" if base else "-",
            mean(name, "guide/query_ms", ".1f"),
            mean(name, "guide/batch_frames", ".1f"),
            mean(name, "guide/lag_env_steps", ".0f"),
            mean(name, "guide/prior_waiting_frac", ".3f"),
            mean(name, "guide/stall_ms", ".2f"),
        )
    Console(width=120).print(table)


if __name__ == "__main__":
    main()
