"""Data: the replay buffer (frames stored once) and, later, the VLM fine-tuning data."""

from covr_lightning.data.replay import ExtraField, ReplayDataModule

__all__ = ["ExtraField", "ReplayDataModule"]
