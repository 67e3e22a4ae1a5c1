"""A copy of the replay's frames on the training device, so batches are gathered there.

Sampling on the host and copying the batch over costs a pixel update two frame stacks per row:
at RAD's settings (batch 128, 9 x 100 x 100 uint8 per observation) 23 MB per update, which at
the thousand updates a second a GPU can reach is more than a PCIe link moves. With
``replay.frames_on_device`` the buffer keeps a second copy of its frames on the device (one
frame is copied over per env step, as it is stored) and gathers each batch's stacks there from
the slot indices; the host arrays stay the source of truth for checkpoints, and the small
fields (actions, rewards, flags, extras) still travel from the host.

The copy holds exactly what the host frames hold: every write goes to both, and after a
checkpoint is loaded the whole copy is refreshed, so a batch gathered on the device equals the
one gathered on the host (tested on the CPU, where the copy is a second torch tensor).
"""

from __future__ import annotations

import numpy as np
import torch

from covr_lightning.errors import ConfigError

__all__ = ["DeviceFrames"]

# Leave room on the device for the networks, the batch and the allocator's slack.
_MAX_SHARE_OF_FREE_MEMORY = 0.8


class DeviceFrames:
    """The replay's ``(capacity, *frame_shape)`` frames mirrored on a torch device.

    Args:
        frames: The host frames the copy mirrors (read once here, then kept in step by
            :meth:`write` and :meth:`refresh`).
        device: Where the copy lives.

    Raises:
        ConfigError: If the frames would take more than 80 % of the device's free memory.
    """

    def __init__(self, frames: np.ndarray, device: torch.device | str) -> None:
        self.device = torch.device(device)
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            if frames.nbytes > _MAX_SHARE_OF_FREE_MEMORY * free:
                raise ConfigError(
                    f"replay.frames_on_device: the replay's frames take "
                    f"{frames.nbytes / 2**30:.1f} GiB, {self.device} has "
                    f"{free / 2**30:.1f} GiB free",
                    "set replay.frames_on_device=false, or lower replay.capacity",
                )
        self.tensor = torch.from_numpy(frames).to(self.device, copy=True)

    def write(self, slot: int, frame: np.ndarray) -> None:
        """Copy one stored frame to its slot."""
        self.tensor[slot].copy_(torch.from_numpy(np.ascontiguousarray(frame)))

    def refresh(self, frames: np.ndarray) -> None:
        """Copy all host frames over (after a checkpoint was loaded into them)."""
        self.tensor.copy_(torch.from_numpy(frames))

    def gather(self, slots: np.ndarray) -> torch.Tensor:
        """Frames at ``slots`` (any shape of slot indices), gathered on the device."""
        index = torch.from_numpy(np.ascontiguousarray(slots, dtype=np.int64)).to(self.device)
        return self.tensor[index]
