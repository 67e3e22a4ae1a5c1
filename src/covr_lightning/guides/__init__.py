"""Prior sources of COVR's actor regulariser: frames and observations in, actions a_v out.

:class:`~covr_lightning.guides.base.Guide` is the interface; the VLM guide
(:class:`covr_lightning.vlm.guide.VLMGuide`) is the paper's, :class:`PolicyGuide` (a trained
policy checkpoint, optionally noisy) and :class:`UniformGuide` (uniform random actions) test the
mechanism without a VLM. A recipe picks one with ``guide.class_path``.
"""

from covr_lightning.guides.base import Guide, GuideContext
from covr_lightning.guides.policy import PolicyGuide
from covr_lightning.guides.served import ServedVLMGuide
from covr_lightning.guides.uniform import UniformGuide

__all__ = ["Guide", "GuideContext", "PolicyGuide", "ServedVLMGuide", "UniformGuide"]
