"""Data: the replay buffer (frames stored once) and D_f, the VLM's fine-tuning data.

``replay*.py`` hold :class:`ReplayDataModule` and its pieces, ``sft*.py`` hold
:class:`~covr_lightning.data.sft.SFTDataModule` and its pieces, and ``eddf.py``, ``ralw.py`` and
``returns.py`` the maths of COVR's filter, weights and return signals.
"""

from covr_lightning.data.replay import ExtraField, ReplayDataModule

__all__ = ["ExtraField", "ReplayDataModule"]
