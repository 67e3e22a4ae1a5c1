"""Random streams of the VLM side, kept apart from the agent's.

Everything the VLM side does with torch's global generator (building the model and its LoRA
adapter, dropout during fine-tuning) runs inside :func:`vlm_stream`: the global state is saved,
reseeded from ``(run seed, purpose)``, and restored afterwards. So up to the first guided step, a
COVR run's agent draws exactly the numbers the same seed draws without COVR, and every later
difference between the two runs is the guidance's doing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch

VLM_BUILD = 0
"""Purpose id of the VLM's construction."""
FINE_TUNE = 1
"""Purpose id of a fine-tune (combined with the round index)."""
GUIDE = 2
"""Purpose id of a guide's own generator (noise of a policy guide, draws of a uniform one)."""
VLM_EVAL = 3
"""Purpose id of the VLM-as-policy evaluation (combined with the round index)."""


def stream_seed(run_seed: int, *purpose: int) -> int:
    """A 63-bit seed for one purpose of one run, independent of the agent's seed stream."""
    state = np.random.SeedSequence([int(run_seed), 0x56_4C_4D, *map(int, purpose)])
    return int(state.generate_state(2, dtype=np.uint64)[0] >> np.uint64(1))


@contextlib.contextmanager
def vlm_stream(run_seed: int, *purpose: int) -> Iterator[None]:
    """Run the body on its own torch generator state; the agent's state is untouched after."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(stream_seed(run_seed, *purpose))
        yield
