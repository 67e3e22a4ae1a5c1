"""Serving the built SFT set: a reshuffled, single-process dataloader of collated batches."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
from torch.utils.data import DataLoader, Dataset, Sampler

from covr_lightning.data.sft_build import BuiltSet


class BuiltRows(Dataset):
    """The built SFT set as (frame, target, weight) items.

    Args:
        frames: ``(N, H, W, 3)`` frames of D_f.
        built: Which rows, with their targets and weights.
    """

    def __init__(self, frames: np.ndarray, built: BuiltSet) -> None:
        self.frames, self.built = frames, built

    def __len__(self) -> int:
        return len(self.built.indices)

    def __getitem__(self, k: int) -> tuple[np.ndarray, str, float]:
        # A copy: D_f's storage may be reallocated or cleared while a batch is still in use.
        row = self.built.indices[k]
        return self.frames[row].copy(), self.built.targets[k], float(self.built.weights[k])


class SeededShuffle(Sampler[int]):
    """A fresh permutation per epoch, drawn from the data module's generator (part of its state).

    Args:
        rng: Returns the generator at the start of each epoch (a load may replace it).
        size: Items per epoch.
    """

    def __init__(self, rng: Callable[[], np.random.Generator], size: int) -> None:
        self.rng, self.size = rng, size

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[int]:
        return iter(self.rng().permutation(self.size).tolist())


def built_dataloader(
    frames: np.ndarray,
    built: BuiltSet,
    batch_size: int,
    rng: Callable[[], np.random.Generator],
) -> DataLoader:
    """Batches of the built set, reshuffled every epoch, as ``collate(frames, targets, weights)``.

    Args:
        frames: ``(N, H, W, 3)`` frames of D_f.
        built: The built set (at least one example).
        batch_size: Examples per batch; the last batch may be smaller.
        rng: Returns the generator that shuffles each epoch.

    Returns:
        A single-process ``DataLoader``: each epoch serves every example once.
    """

    def collate_rows(items: list[tuple[np.ndarray, str, float]]) -> dict:
        rows, targets, weights = zip(*items, strict=True)
        return built.collate(list(rows), list(targets), np.asarray(weights, dtype=np.float64))

    rows = BuiltRows(frames, built)
    return DataLoader(
        rows,
        batch_size=batch_size,
        sampler=SeededShuffle(rng, len(rows)),
        drop_last=False,
        num_workers=0,
        collate_fn=collate_rows,
    )
