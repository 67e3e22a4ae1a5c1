"""Print the deployed policy's latency (ms per action, batch 1) and its exported size.

    python benchmarks/policy_latency.py --checkpoint runs/covr-quickstart/quickstart
    python benchmarks/policy_latency.py --recipe dmc_cheetah            # untrained, same architecture
    python benchmarks/policy_latency.py --recipe quickstart policy.hidden_dim=1024

Figures, on CPU (torch's default thread count) and on CUDA when available:
  act       ``SACPolicyModule.act(obs, deterministic=True)``: numpy uint8 in, numpy action out
  exported  the TorchScript file of ``covr-lightning export`` (encoder + actor): uint8 tensor in,
            action tensor out (on CUDA: host -> device -> host, like ``act``)
  size      the exported file in MB (10^6 bytes)

The paper deploys only the small policy: 1.2 ms per action and 10 MB.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from covr_lightning.build import build_env, build_policy, build_trained_policy, load_saved_run
from covr_lightning.commands.export import export_policy, trace_policy
from covr_lightning.config import load_recipe

PAPER_MS, PAPER_MB = 1.2, 10.0


def timed(fn, iters: int, warmup: int = 20, sync: bool = False) -> float:
    """Median ms of ``fn()`` over ``iters`` calls after ``warmup``."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        if sync:
            torch.cuda.synchronize()
        samples.append(1000 * (time.perf_counter() - start))
    return statistics.median(samples)


def build(args, workdir: Path):
    """(policy, one real observation, exported file, label)."""
    if args.checkpoint:
        saved = load_saved_run(args.checkpoint)
        env = build_env(saved.cfg, seed=0)
        policy = build_trained_policy(saved, env)
        out, _ = export_policy(args.checkpoint, workdir / "policy.pt")
        label = f"checkpoint {saved.checkpoint}"
    else:
        cfg = load_recipe(args.recipe, args.overrides)
        env = build_env(cfg, seed=0)
        policy = build_policy(cfg, env).eval()
        first, _ = env.reset(seed=0)
        example = torch.as_tensor(first).unsqueeze(0).repeat(2, *[1] * first.ndim)
        out = workdir / "policy.pt"
        trace_policy(policy, example).save(str(out))
        label = f"recipe {args.recipe} (untrained)"
    obs, _ = env.reset(seed=0)
    env.close()
    return policy, obs, out, label


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="run dir, checkpoint dir or state.pt")
    source.add_argument("--recipe", help="build an untrained policy of this recipe")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe overrides")
    parser.add_argument("--iters", type=int, default=300, help="timed calls per figure")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        policy, obs, out, label = build(args, Path(tmp))
        size_mb = out.stat().st_size / 1e6
        params = sum(p.numel() for p in [*policy.encoder.parameters(), *policy.actor.parameters()])
        print(f"{label}")
        print(
            f"  obs {tuple(obs.shape)} {obs.dtype} -> network {tuple(policy.network_obs_shape)}, "
            f"action dim {policy.action_dim}, encoder + actor {params / 1e6:.2f} M parameters"
        )
        print(f"  exported size {size_mb:.2f} MB   (paper: {PAPER_MB:g} MB)")
        print(f"  torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
        for device in devices:
            policy.to(device)
            exported = torch.jit.load(str(out), map_location=device)
            x = torch.from_numpy(obs).unsqueeze(0)
            sync = device == "cuda"
            with torch.no_grad():
                act_ms = timed(lambda: policy.act(obs, deterministic=True), args.iters, sync=sync)
                exp_ms = timed(
                    lambda m=exported, x=x, d=device: m(x.to(d)).cpu(), args.iters, sync=sync
                )
            name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
            print(
                f"  {device:<4} ({name}): act {act_ms:.3f} ms/action   exported "
                f"{exp_ms:.3f} ms/action   (paper: {PAPER_MS:g} ms)"
            )


if __name__ == "__main__":
    main()
