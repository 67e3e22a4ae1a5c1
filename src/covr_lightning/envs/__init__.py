"""Environments behind the gymnasium API (env step = one physics control step).

:class:`PixelEnv` (``base.py``) states the protocol the loop relies on and implements the agent
step once; :class:`DMCEnv`, :class:`CarRacingEnv` and :class:`CarlaEnv` (the ``carla`` package)
fill in their simulators. Importing this package loads none of the optional simulators:
``carla`` is imported when a :class:`CarlaEnv` is built, Box2D and pygame when a
:class:`CarRacingEnv` is.
"""

# dmc first: it picks MuJoCo's headless GL backend, which only works before anything imports MuJoCo.
from covr_lightning.envs.dmc import DMCEnv  # isort: skip

from covr_lightning.envs.base import PixelEnv
from covr_lightning.envs.car_racing import CarRacingEnv
from covr_lightning.envs.carla import CarlaEnv
from covr_lightning.envs.vector import EnvPool

__all__ = ["CarRacingEnv", "CarlaEnv", "DMCEnv", "EnvPool", "PixelEnv"]
