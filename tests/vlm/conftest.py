"""The tiny backbone, loaded once per test session (a few seconds)."""

from __future__ import annotations

import numpy as np
import pytest

from covr_lightning.vlm.codecs import make_codec
from covr_lightning.vlm.prompting import ActionPrompt


@pytest.fixture(scope="session")
def tiny_backbone():
    """``(model, processor)`` of ``tiny-qwen2.5-vl``; do not train it (shared)."""
    from covr_lightning.vlm.backbones import load_backbone

    return load_backbone("tiny-qwen2.5-vl")


@pytest.fixture
def codec2():
    """A two-actuator DMC codec."""
    return make_codec("numeric", -np.ones(2), np.ones(2))


@pytest.fixture
def prompt2(codec2):
    """A task prompt for the two-actuator codec."""
    return ActionPrompt("swing the pole up and balance it", codec2.describe())
