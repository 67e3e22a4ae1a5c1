"""Environments behind the gymnasium API (env step = one physics control step)."""

from covr_lightning.envs.dmc import DMCEnv

__all__ = ["DMCEnv"]
