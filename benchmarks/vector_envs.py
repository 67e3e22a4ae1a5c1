"""Training env steps/s with 1 vs N envs (``run.num_envs``) on this machine.

    python benchmarks/vector_envs.py                      # quickstart recipe, 1 and 2 envs
    python benchmarks/vector_envs.py --envs 1 2 4 --recipe dmc_cheetah vlm.backbone=tiny-qwen2.5-vl

Three figures per N, each the real loop (built by :func:`covr_lightning.build.build_loop`) with
MLflow off and checkpoints in a temporary folder:

  collect   env steps/s of warm-up steps only (random actions, no update): what the worker
            processes buy directly (physics and rendering of N envs run in parallel)
  train     env steps/s with one SAC update per agent step (of each env), COVR off: the update
            dominates on a CPU, so N envs cannot do much better than one here
  guided    env steps/s in a guided COVR round (VLM render + batched guide query every
            ``covr.guide_every`` frames of each env, plus the updates)

Env steps are counted across envs (agent steps x action repeat, summed), as everywhere.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from covr_lightning.build import build_loop
from covr_lightning.config import load_recipe
from covr_lightning.tracking.progress import TrainingProgress


def measure(recipe: str, overrides: list[str], num_envs: int, mode: str, env_steps: int) -> float:
    """Env steps/s of ``env_steps`` steps of the loop in one of the three modes."""
    common = [
        *overrides,
        f"run.num_envs={num_envs}",
        "tracking.enabled=false",
        f"run.name=bench-{mode}-{num_envs}",
        "run.eval_every_env_steps=100000000",
        "run.checkpoint_every_env_steps=100000000",
    ]
    if mode == "collect":
        extra = ["covr.enabled=false", f"run.seed_env_steps={10 * env_steps}"]
    elif mode == "train":
        extra = ["covr.enabled=false", "run.seed_env_steps=0"]
    else:  # guided from the first step: psi_0 = budget would make one unguided round
        extra = ["run.seed_env_steps=0", "covr.cold_start_rounds=0", "covr.psi_0=100000000"]
    cfg = load_recipe(recipe, [*common, *extra, f"run.total_env_steps={10 * env_steps}"])
    loop = build_loop(cfg)  # RLLoop with COVR off, COVRLoop on
    if mode == "guided":
        loop.module.prior_weight = loop.covr.prior_weight
    warm = loop.action_repeat * num_envs * 4  # first steps start workers' GL and allocate
    with TrainingProgress(10 * env_steps, 0) as loop.progress:
        loop.train_until(warm)
        start, done = time.perf_counter(), loop.env_steps
        loop.train_until(done + env_steps)
        rate = (loop.env_steps - done) / (time.perf_counter() - start)
    loop.close()
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="quickstart")
    parser.add_argument("--envs", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--env-steps", type=int, default=1600, help="measured env steps per figure")
    parser.add_argument("--modes", nargs="+", default=["collect", "train", "guided"])
    parser.add_argument("overrides", nargs="*", help="recipe overrides, e.g. replay.batch_size=128")
    args = parser.parse_args()
    print(f"recipe {args.recipe}  {os.cpu_count()} CPU cores  overrides {args.overrides or '-'}")
    with tempfile.TemporaryDirectory() as folder:
        os.chdir(folder)
        rows = {}
        for mode in args.modes:
            for n in args.envs:
                rows[mode, n] = measure(args.recipe, args.overrides, n, mode, args.env_steps)
                base = rows[mode, args.envs[0]]
                print(
                    f"{mode:8s} num_envs={n}: {rows[mode, n]:8.1f} env steps/s "
                    f"({rows[mode, n] / base:.2f}x of num_envs={args.envs[0]})",
                    flush=True,
                )


if __name__ == "__main__":
    main()
