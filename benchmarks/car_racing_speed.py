"""Env steps/s of ``CarRacingEnv`` (84 px frames, action repeat) next to plain CarRacing-v3.

    python benchmarks/car_racing_speed.py
    python benchmarks/car_racing_speed.py --agent-steps 500 --action-repeat 8

``CarRacingEnv`` draws only the last env step of each repeat (drawing the 1000x800 surface is most
of an env step's cost); plain CarRacing-v3 draws every step. Needs ``covr-lightning[box2d]``.
"""

from __future__ import annotations

import argparse
import time

import gymnasium
import numpy as np

from covr_lightning.envs.car_racing import CarRacingEnv


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agent-steps", type=int, default=300)
    parser.add_argument("--action-repeat", type=int, default=4)
    args = parser.parse_args()

    env = CarRacingEnv(action_repeat=args.action_repeat, seed=0)
    env.reset(seed=0)
    action = np.array([0.0, 0.3, -1.0], np.float32)  # straight, a little gas, no brake
    start, env_steps = time.perf_counter(), 0
    for _ in range(args.agent_steps):
        _, _, terminated, truncated, info = env.step(action)
        env_steps += info["env_steps"]
        if terminated or truncated:
            env.reset()
    ours = env_steps / (time.perf_counter() - start)
    env.close()

    plain = gymnasium.make("CarRacing-v3", render_mode="rgb_array")
    plain.reset(seed=0)
    start = time.perf_counter()
    for _ in range(env_steps):
        _, _, terminated, truncated, _ = plain.step(np.array([0.0, 0.65, 0.0]))
        if terminated or truncated:
            plain.reset()
    reference = env_steps / (time.perf_counter() - start)
    plain.close()
    print(
        f"CarRacingEnv (84 px, action repeat {args.action_repeat}): {ours:.0f} env steps/s; "
        f"plain CarRacing-v3: {reference:.0f} env steps/s ({ours / reference:.1f}x)"
    )


if __name__ == "__main__":
    main()
