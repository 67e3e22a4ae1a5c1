"""CARLA 0.9.x driving: #HW (highway traffic) and #GP (ghost pedestrian), on a server you run.

The env is a client of a CARLA server that runs separately (``docs/carla.md``); the ``carla``
package is an optional extra, imported when an env is built, never when this package is.

- :mod:`~covr_lightning.envs.carla.server`: one connection per host:port shared by this
  process's envs, world ownership and parking, the lock file against a second process,
  reconnects.
- :mod:`~covr_lightning.envs.carla.scenarios`: Town04's highway, traffic and the pedestrian, the
  end conditions and the DBC / ResAct reward.
- :mod:`~covr_lightning.envs.carla.env`: :class:`CarlaEnv`, the :class:`PixelEnv` on top.
"""

from covr_lightning.envs.carla.env import CarlaEnv
from covr_lightning.envs.carla.scenarios import highway_reward, split_action

__all__ = ["CarlaEnv", "highway_reward", "split_action"]
