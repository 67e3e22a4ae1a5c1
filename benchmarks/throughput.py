"""Print throughput figures for a recipe: rendering, SAC updates, and end-to-end training.

    python benchmarks/throughput.py                       # quickstart recipe, CPU (+ CUDA if present)
    python benchmarks/throughput.py --recipe dmc_cheetah --updates 20
    python benchmarks/throughput.py --recipe quickstart replay.batch_size=128
    python benchmarks/throughput.py --recipe dmc_cheetah replay.batch_size=128 --profile 10
    python benchmarks/throughput.py --recipe dmc_cheetah replay.batch_size=128 --plain-convs

Figures:
  render    env frames/s of the recipe's env (one render per agent step), next to dm_control's
            default ``physics.render`` (640x480 offscreen buffer with 4x MSAA) at the same size
  updates   SAC updates/s at the recipe's batch size, per device
  training  env steps/s of the real loop (act + env step + replay + one update per agent step)
            after warm-up, per device; MLflow off, checkpoints in a temporary folder
  profile   with ``--profile N``: where N updates spend their time (torch.profiler, self time per
            operator, ms per update), CPU only

``--plain-convs`` runs the bf16 encoder's convolutions and ReLUs as separate ops instead of the
fused oneDNN call (:mod:`covr_lightning.policies.fused_conv`), to measure what the fusion buys.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch

from covr_lightning.build import build_env, build_policy
from covr_lightning.config import load_recipe


def render_speed(cfg, steps: int) -> tuple[float, float]:
    """(frames/s of the recipe's env, frames/s of dm_control's default render at that size)."""
    env = build_env(cfg, seed=0)
    env.reset()
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for _ in range(steps):
        _, _, terminated, truncated, _ = env.step(rng.uniform(-1, 1, env.action_space.shape))
        if terminated or truncated:
            env.reset()
    ours = steps / (time.perf_counter() - start)

    from covr_lightning.envs.dmc import _quiet_load

    args = cfg.env.init_args
    size = args.get("image_size", 84)
    reference = _quiet_load(args.domain, args.task, 0)
    reference.reset()
    start = time.perf_counter()
    for _ in range(max(steps // 4, 10)):
        reference.physics.render(size, size, camera_id=0)
    default = max(steps // 4, 10) / (time.perf_counter() - start)
    env.close()
    return ours, default


def _update_setup(cfg, device: str):
    """The recipe's policy set up by Fabric, a random batch at its batch size, and the env."""
    from lightning import Fabric

    env = build_env(cfg, seed=0)
    policy = build_policy(cfg, env)
    fabric = Fabric(accelerator=device, devices=1, precision=cfg.run.precision)
    policy, *_ = fabric.setup(policy, *policy.configure_optimizers())
    batch_size = cfg.replay.init_args.batch_size
    obs_shape, action_dim = env.observation_space.shape, env.action_space.shape[0]
    frames = torch.randint(0, 256, (batch_size, *obs_shape), dtype=torch.uint8)
    batch = {
        "obs": frames,
        "next_obs": frames.roll(1, 0),
        "action": torch.rand(batch_size, action_dim) * 2 - 1,
        "reward": torch.rand(batch_size),
        "terminated": torch.zeros(batch_size),
    }
    if env.observation_space.dtype != np.uint8:
        batch["obs"] = batch["next_obs"] = torch.randn(batch_size, *obs_shape)
    return policy, fabric.to_device(batch), env


def update_speed(cfg, device: str, updates: int) -> float:
    """SAC updates per second at the recipe's batch size on ``device``."""
    policy, batch, env = _update_setup(cfg, device)
    for step in range(3):  # warm-up (allocator, cuDNN autotune)
        policy.training_step(batch, step)
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for step in range(updates):
        policy.training_step(batch, step)
    if device == "cuda":
        torch.cuda.synchronize()
    env.close()
    return updates / (time.perf_counter() - start)


def update_profile(cfg, updates: int, rows: int = 14) -> None:
    """Print the operators that take the most self time over ``updates`` CPU updates."""
    from torch.profiler import ProfilerActivity, profile

    policy, batch, env = _update_setup(cfg, "cpu")
    for step in range(3):
        policy.training_step(batch, step)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for step in range(updates):
            policy.training_step(batch, step)
    env.close()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) / 1000 / updates
    print(f"profile   {total:.0f} ms per update (self time, all operators), top {rows}:")
    for event in events[:rows]:
        ms = event.self_cpu_time_total / 1000 / updates
        calls = event.count / updates
        print(f"  {ms:7.1f} ms  {100 * ms / total:4.1f} %  {calls:5.1f} calls  {event.key}")


def training_speed(recipe: str, overrides: list[str], device: str, env_steps: int) -> float:
    """Env steps/s of the real loop after warm-up (one update per agent step)."""
    from covr_lightning.build import build_loop
    from covr_lightning.tracking.progress import TrainingProgress

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_recipe(
            recipe,
            [
                *overrides,
                f"run.dir={tmp}",
                f"run.accelerator={device}",
                "tracking.enabled=false",
                "run.eval_every_env_steps=100000000",
                "run.checkpoint_every_env_steps=100000000",
                "covr.enabled=false",
            ],
        )
        loop = build_loop(cfg)
        warmup = cfg.run.seed_env_steps
        with TrainingProgress(warmup + env_steps) as loop.progress:
            loop.next_eval_at = 10**12  # measure training only
            loop.train_until(warmup + 2 * loop.action_repeat)
            start_steps, start = loop.env_steps, time.perf_counter()
            loop.train_until(warmup + env_steps)
            return (loop.env_steps - start_steps) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="quickstart")
    parser.add_argument("--render-steps", type=int, default=300)
    parser.add_argument("--updates", type=int, default=30)
    parser.add_argument("--train-env-steps", type=int, default=800)
    parser.add_argument("--profile", type=int, default=0, metavar="N", help="profile N updates")
    parser.add_argument(
        "--plain-convs", action="store_true", help="no fused conv+ReLU (to compare against)"
    )
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    if args.plain_convs:
        from covr_lightning.policies import fused_conv

        fused_conv.fused_conv_relu_available = lambda: False

    cfg = load_recipe(args.recipe, args.overrides)
    env_args = cfg.env.init_args
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(
        f"recipe {args.recipe}: {env_args.domain} {env_args.task}, obs {env_args.obs} "
        f"{env_args.get('image_size')}px, batch {cfg.replay.init_args.batch_size}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads"
        + (", plain convs (no fusion)" if args.plain_convs else "")
    )
    ours, default = render_speed(cfg, args.render_steps)
    print(
        f"render    {ours:8.1f} frames/s (env step incl. physics)   dm_control default render "
        f"{default:8.1f} frames/s"
    )
    for device in devices:
        speed = update_speed(cfg, device, args.updates)
        print(f"updates   {speed:8.2f} updates/s   ({1000 / speed:.0f} ms per update)   [{device}]")
    if args.profile:
        update_profile(cfg, args.profile)
    for device in devices:
        speed = training_speed(args.recipe, args.overrides, device, args.train_env_steps)
        print(f"training  {speed:8.2f} env steps/s   [{device}]")


if __name__ == "__main__":
    main()
