"""``covr-lightning export``: the deployable policy as one TorchScript file plus its spec.

The file holds the encoder and the actor only (no critic, no targets, no VLM) and runs the
deterministic action path of :meth:`SACPolicyModule.act`::

    uint8 obs (B, C, H, W) -> observation_transform -> encoder -> actor mean -> tanh -> (B, A)

It is traced with :func:`torch.jit.trace`, so ``torch.jit.load`` reads it with nothing but torch
installed. ``policy.json`` beside it records the observation spec (shape, dtype, frame stack), the
action spec (dim, bounds), the env (class path, init args, action repeat) and the source
checkpoint.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from covr_lightning.build import SavedRun, build_env, build_trained_policy, load_saved_run
from covr_lightning.config import config_to_dict
from covr_lightning.envs.base import PixelEnv
from covr_lightning.errors import ConfigError
from covr_lightning.policies.sac import SACPolicyModule


class DeterministicPolicy(nn.Module):
    """The deterministic action path of a SAC policy: encoder + actor, nothing else.

    Args:
        policy: A :class:`~covr_lightning.policies.sac.SACPolicyModule` (or subclass); its
            ``observation_transform`` is called while tracing, its encoder and actor are kept.
    """

    def __init__(self, policy: SACPolicyModule) -> None:
        super().__init__()
        self.encoder = policy.encoder
        self.actor = policy.actor
        # A plain function, not a registered module: the critic and targets stay out of the file.
        self._transform = policy.observation_transform

    def forward(self, obs: Tensor) -> Tensor:
        """``(B, C, H, W)`` uint8 observations -> ``(B, A)`` float32 actions in [-1, 1]."""
        x = self._transform(obs)
        _, _, mean_action = self.actor(self.encoder(x), deterministic=True)
        return mean_action


def trace_policy(policy: SACPolicyModule, example_obs: Tensor) -> torch.jit.ScriptModule:
    """Trace the deterministic action path of ``policy`` on ``example_obs`` (a uint8 batch).

    The trace is checked on a batch of another size, so the batch dimension stays free.
    """
    policy = policy.eval()
    wrapper = DeterministicPolicy(policy).eval()
    with torch.no_grad(), warnings.catch_warnings():
        # torch >= 2.10 marks TorchScript deprecated; shape-derived Python ints (RAD's crop
        # offsets) raise TracerWarnings. Both are fine here: the trace is checked just below.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(wrapper, (example_obs,), check_trace=False)
        other = torch.cat([example_obs, example_obs[:1]])  # a different batch size
        expected = wrapper(other)
        got = traced(other)
    if got.shape != expected.shape or not torch.allclose(got, expected, atol=1e-6, rtol=0):
        raise ConfigError(
            f"the traced policy of {type(policy).__name__} does not reproduce its actions",
            "keep observation_transform free of data-dependent Python control flow",
        )
    return traced


def policy_spec(
    saved: SavedRun, env: PixelEnv, policy: SACPolicyModule, out: Path
) -> dict[str, Any]:
    """The JSON spec written beside the exported file."""
    env_cfg = config_to_dict(saved.cfg)["env"]
    obs_space, act_space = env.observation_space, env.action_space
    return {
        "format": "torchscript",
        "file": out.name,
        "load": "torch.jit.load(file, map_location='cpu')",
        "observation": {
            "shape": [int(s) for s in obs_space.shape],
            "dtype": str(obs_space.dtype),
            "layout": "(B, C, H, W): frame_stack RGB frames stacked on channels, oldest first",
            "low": 0 if str(obs_space.dtype) == "uint8" else None,
            "high": 255 if str(obs_space.dtype) == "uint8" else None,
            "frame_shape": [int(s) for s in env.frame_shape],
            "frame_stack": int(env.frame_stack),
            "network_shape": [int(s) for s in policy.network_obs_shape],
        },
        "action": {
            "dim": int(act_space.shape[0]),
            "dtype": "float32",
            "low": -1.0,
            "high": 1.0,
            "note": "the env maps [-1, 1] linearly onto its own actuator bounds",
        },
        "env": {
            "class_path": env_cfg["class_path"],
            "init_args": env_cfg.get("init_args", {}),
            "action_repeat": int(env.action_repeat),
        },
        "policy_class": saved.policy_class,
        "source_checkpoint": str(saved.checkpoint.resolve()),
        "env_steps": saved.env_steps,
        "torch_version": torch.__version__,
    }


def export_policy(checkpoint: str | Path, out: str | Path) -> tuple[Path, Path]:
    """Export a checkpoint's policy to ``out`` (TorchScript) and ``out`` with suffix ``.json``.

    Returns:
        ``(policy file, spec file)``.

    Raises:
        ConfigError: Bad checkpoint, unwritable ``out``, or a policy that does not trace.
    """
    out = Path(out).expanduser()
    if out.suffix == ".json":
        raise ConfigError(f"--out {out} would clash with the spec file", "use --out policy.pt")
    saved = load_saved_run(checkpoint)
    env = build_env(saved.cfg, seed=0)
    try:
        policy = build_trained_policy(saved, env, device="cpu")
        first, _ = env.reset(seed=0)
        example = torch.as_tensor(first).unsqueeze(0).repeat(2, *[1] * first.ndim)
        traced = trace_policy(policy, example)
        spec = policy_spec(saved, env, policy, out)
    finally:
        env.close()
    spec_file = out.with_suffix(".json")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        traced.save(str(out))
    except (OSError, RuntimeError) as err:
        raise ConfigError(f"cannot write {out} ({err})", "pass --out in a writable folder") from err
    spec["size_bytes"] = out.stat().st_size
    spec["sha256"] = hashlib.sha256(out.read_bytes()).hexdigest()
    spec_file.write_text(json.dumps(spec, indent=2) + "\n")
    return out, spec_file


def run(args: argparse.Namespace) -> int:
    """``covr-lightning export``."""
    out, spec_file = export_policy(args.checkpoint, args.out)
    size = out.stat().st_size
    print(f"exported {out} ({size / 1e6:.2f} MB, {size:,} bytes), spec {spec_file}")
    return 0
