"""Several copies of a recipe's env stepped together, in worker processes when there are two or more.

The training loop steps all envs with one batch of actions, stores each env's transition in its own
replay stream, and resets each env on its own when its episode ends (so episodes stay whole and
every reset gets the loop's per-episode seed). gymnasium's vector API does the work:
:class:`gymnasium.vector.AsyncVectorEnv` (one process per env, observations through shared memory)
for ``num_envs >= 2``, :class:`gymnasium.vector.SyncVectorEnv` (in-process, no copies of the GL
context or the physics) for one env, both with autoreset disabled because the loop resets envs itself.

Workers are started with ``spawn``: a forked child would inherit the parent's GL (EGL) state and
torch's thread pool, neither of which survives a fork reliably.
"""

from __future__ import annotations

import importlib
import multiprocessing
import os
from collections.abc import Callable
from functools import partial
from typing import Any

import gymnasium
import numpy as np
from gymnasium.vector import AsyncVectorEnv, AutoresetMode, SyncVectorEnv

from covr_lightning.envs.base import PixelEnv
from covr_lightning.errors import ConfigError


def _build_env(module: str, qualname: str, init_args: dict[str, Any], seed: int) -> PixelEnv:
    """Build one env in the current process (module-level, so that workers can unpickle it)."""
    # A worker only steps physics and renders: one thread each keeps N workers off the learner's
    # cores (torch, if the env module imports it, would otherwise start a thread per core). Only
    # in a worker: in the main process the variable would leak into every later subprocess. The
    # class travels as its import path and is imported only now, after the variable is set: an
    # env module that imports torch at its top reads it then.
    if multiprocessing.parent_process() is not None:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    env_class: Any = importlib.import_module(module)
    for name in qualname.split("."):
        env_class = getattr(env_class, name)
    return env_class(**init_args, seed=seed)


def env_factories(
    env_class: type[PixelEnv], init_args: dict[str, Any], seeds: list[int]
) -> list[Callable[[], PixelEnv]]:
    """One picklable zero-argument constructor per seed.

    Args:
        env_class: The env class; it travels to the workers by reference (its module and name),
            so it must be importable there, as a recipe's ``class_path`` is.
        init_args: Constructor arguments (the recipe's ``env.init_args``), without ``seed``.
        seeds: One seed per env.

    Returns:
        ``len(seeds)`` constructors; constructor ``i`` builds ``env_class(**init_args,
        seed=seeds[i])``.
    """
    where = (env_class.__module__, env_class.__qualname__)
    return [partial(_build_env, *where, dict(init_args), int(seed)) for seed in seeds]


class EnvPool:
    """``num_envs`` copies of one env behind a small batched API.

    Args:
        factories: One zero-argument env constructor per env (picklable for ``num_envs >= 2``).
        workers: Step the envs in worker processes; ``None`` means "when there are two or more".

    Attributes:
        num_envs: Number of envs.
        observation_space: One env's observation space.
        action_space: One env's action space.

    Raises:
        ConfigError: If ``factories`` is empty (``run.num_envs=0`` in a recipe).
    """

    def __init__(self, factories: list[Callable[[], gymnasium.Env]], workers: bool | None = None):
        if not factories:
            raise ConfigError("an env pool needs at least one env", "set run.num_envs >= 1")
        self.num_envs = len(factories)
        workers = self.num_envs > 1 if workers is None else workers
        if workers:
            self._vec: AsyncVectorEnv | SyncVectorEnv = AsyncVectorEnv(
                factories, context="spawn", autoreset_mode=AutoresetMode.DISABLED, copy=True
            )
        else:
            self._vec = SyncVectorEnv(factories, autoreset_mode=AutoresetMode.DISABLED, copy=True)
        self.observation_space = self._vec.single_observation_space
        self.action_space = self._vec.single_action_space

    def reset(self, index: int, seed: int) -> np.ndarray:
        """Reset env ``index`` with ``seed``; returns its first observation."""
        mask = np.zeros(self.num_envs, dtype=bool)
        mask[index] = True
        seeds: list[int | None] = [None] * self.num_envs
        seeds[index] = int(seed)
        obs, _ = self._vec.reset(seed=seeds, options={"reset_mask": mask})
        return obs[index]

    def step(
        self, actions: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[dict[str, Any]]]:
        """Step every env with its row of ``actions`` ``(N, A)``.

        Returns:
            ``(obs (N, ...), rewards (N,), terminated (N,), truncated (N,), infos)``, with one
            info dict per env.
        """
        obs, rewards, terminated, truncated, info = self._vec.step(np.asarray(actions))
        return obs, rewards, terminated, truncated, self._split_info(info)

    def render(self, height: int, width: int) -> np.ndarray:
        """Every env's ``render(height, width)``: ``(N, height, width, 3)`` uint8."""
        # Plain ints: a recipe's bounded int types only exist in the process that parsed it.
        return np.stack(self._vec.call("render", int(height), int(width)))

    def get_attr(self, name: str) -> tuple[Any, ...]:
        """An attribute of every env."""
        return self._vec.get_attr(name)

    def close(self) -> None:
        """Close every env (and stop the workers)."""
        self._vec.close()

    def _split_info(self, info: dict[str, Any]) -> list[dict[str, Any]]:
        """gymnasium's batched info (values plus ``_key`` masks) back to one dict per env."""
        out: list[dict[str, Any]] = [{} for _ in range(self.num_envs)]
        for key, values in info.items():
            if key.startswith("_"):
                continue
            mask = info.get(f"_{key}", np.ones(self.num_envs, dtype=bool))
            for i in np.flatnonzero(mask):
                out[i][key] = values[i]
        return out
