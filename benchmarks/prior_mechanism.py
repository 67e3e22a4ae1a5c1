"""What the prior path does, without a VLM: guides of known quality, with and without the Q-filter.

On the quickstart's env (cartpole swingup from pixels, 20k env steps), train with a guide that is

- ``trained``: a trained policy's deterministic action (``PolicyGuide``, noise 0),
- ``noisy``: the same policy plus N(0, ``--noise``^2) per dimension, clipped,
- ``random``: uniform random actions (``UniformGuide``),

each with ``covr.prior_filter`` ``none`` (the paper) and ``q`` (Q-filter), and ``unguided``
(``covr.enabled=false``, the same agent and seeds). Guidance is on from the first agent step
(``cold_start_rounds=0``); the VLM side is reduced to what the loop cannot skip (a D_f row per
episode, one SFT step per round, no VLM evaluation), since no VLM guides here.

Each setting runs ``--seeds`` through ``covr-lightning fit --seeds`` (one MLflow parent per
setting, experiment ``--experiment``); then ``covr-lightning compare`` prints final-return and AUC
IQM per setting and plots the curves into ``--out`` (``mechanism<suffix>.png``: only the
settings of this invocation and ``unguided``).

    python benchmarks/prior_mechanism.py --teacher runs/teacher/teacher/checkpoints/env_step_000015000
    python benchmarks/prior_mechanism.py --teacher PATH --seeds 1-3 --parallel 2 --only random-none
    python benchmarks/prior_mechanism.py --teacher PATH --suffix=-held covr.prior_scope=held

The teacher is any finished quickstart run (``covr-lightning fit --recipe quickstart
covr.enabled=false run.seed=100 run.name=teacher``); pass the checkpoint whose eval return you want
as the "trained" guide's quality. Runs are written under the current folder (``runs/``,
``mlflow.db``); run the script from a scratch folder.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

# Only what a prior-path measurement needs of the VLM side: it still exists in a COVR run.
QUIET_VLM = [
    "covr.sft_every=1000",
    "covr.sft_min_steps=0",
    "covr.sft_max_steps=1",
    "covr.vlm_eval_episodes=0",
    "covr.cold_start_rounds=0",
]


def settings(teacher: str, noise: float) -> dict[str, list[str]]:
    """Setting name -> recipe overrides."""
    policy = [
        "guide.class_path=covr_lightning.guides.PolicyGuide",
        f"guide.init_args.checkpoint={teacher}",
    ]
    uniform = ["guide.class_path=covr_lightning.guides.UniformGuide"]
    out: dict[str, list[str]] = {"unguided": ["covr.enabled=false"]}
    for name, guide in (
        ("trained", [*policy, "guide.init_args.noise=0.0"]),
        ("noisy", [*policy, f"guide.init_args.noise={noise}"]),
        ("random", uniform),
    ):
        for prior_filter in ("none", "q"):
            out[f"{name}-{prior_filter}"] = [
                *QUIET_VLM,
                *guide,
                f"covr.prior_filter={prior_filter}",
            ]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--teacher", required=True, help="checkpoint or run dir of a trained policy"
    )
    parser.add_argument("--noise", type=float, default=1.0, help="std of the noisy guide's noise")
    parser.add_argument("--seeds", default="1-3")
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--experiment", default="covr-mechanism")
    parser.add_argument("--out", default="comparison/covr-mechanism")
    parser.add_argument("--only", default="", help="comma-separated setting names to run")
    parser.add_argument(
        "--suffix", default="", help="appended to run names (runs with other overrides)"
    )
    parser.add_argument("--report-only", action="store_true", help="compare what already ran")
    parser.add_argument("overrides", nargs="*", help="extra recipe overrides for every setting")
    args = parser.parse_args()

    teacher = str(Path(args.teacher).resolve())
    chosen = settings(teacher, args.noise)
    if args.only:
        chosen = {k: v for k, v in chosen.items() if k in args.only.split(",")}
    if not args.report_only:
        for name, overrides in chosen.items():
            start = time.perf_counter()
            command = [
                sys.executable, "-m", "covr_lightning", "fit", "--recipe", "quickstart",
                "--seeds", args.seeds, "--parallel", str(args.parallel),
                f"run.name={name}{args.suffix}", f"tracking.experiment={args.experiment}",
                *overrides, *args.overrides,
            ]  # fmt: skip
            print(f"== {name}: {' '.join(command[3:])}", flush=True)
            done = subprocess.run(command, stdout=subprocess.DEVNULL, check=False)
            print(f"   exit {done.returncode}, {time.perf_counter() - start:.0f} s", flush=True)
            if done.returncode != 0:
                return done.returncode
    compare = [
        sys.executable, "-m", "covr_lightning", "compare", "--experiment", args.experiment,
        "--at-env-steps", "2504,5000,10000", "--out", args.out,
    ]  # fmt: skip
    code = subprocess.run(compare, check=False).returncode
    if code == 0:
        path = Path(args.out) / f"mechanism{args.suffix}.png"
        plot(args.experiment, [f"{name}{args.suffix}" for name in chosen], path)
        print(f"wrote {path}")
    return code


def plot(experiment: str, names: list[str], path: Path) -> None:
    """Learning curves of ``names`` (and ``unguided``) only: the full comparison has every run."""
    from covr_lightning.tracking.compare import group_runs
    from covr_lightning.tracking.mlflow import load_runs
    from covr_lightning.tracking.report import learning_curves

    wanted = {*names, "unguided"}
    curves = [
        c for c in load_runs(experiment, "eval/return") if c.name.rsplit("-seed", 1)[0] in wanted
    ]
    title = f"{experiment}: eval/return ({path.stem})"
    learning_curves(group_runs(curves, ["run.name"]), ["run.name"], "eval/return", path, title)


if __name__ == "__main__":
    raise SystemExit(main())
