"""Serving the built SFT set: a reshuffled, single-process dataloader of collated batches.

A batch is padded to its longest example, so by default batches are drawn from examples of
similar length (:class:`LengthBuckets`): the prompt and image tokens are the same for every row,
and what varies is the target text (a codec's answer, e.g. ``[0.12, -0.5]``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler

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


class LengthBuckets(Sampler[list[int]]):
    """Batches of examples of similar length, in random order (a fresh draw every epoch).

    Each epoch: a random permutation, cut into pools of ``pool_batches`` batches; each pool is
    sorted by length and cut into batches; the batches of all pools are served shuffled. So a
    batch pads to a length close to its own examples', while which examples meet in a batch and
    the batch order stay random (sorting the whole set would serve the long ones last).

    Args:
        rng: Returns the generator at the start of each epoch (a load may replace it).
        lengths: ``(N,)`` length of each example (characters of its target text).
        batch_size: Examples per batch; a pool's last batch may be smaller.
        pool_batches: Batches per sorted pool.
    """

    def __init__(
        self,
        rng: Callable[[], np.random.Generator],
        lengths: np.ndarray,
        batch_size: int,
        pool_batches: int = 16,
    ) -> None:
        self.rng, self.lengths = rng, np.asarray(lengths)
        self.batch_size, self.pool = batch_size, batch_size * pool_batches

    def __len__(self) -> int:
        n, full = len(self.lengths), self.pool
        return (n // full) * -(-full // self.batch_size) + -(-(n % full) // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        rng = self.rng()
        order = rng.permutation(len(self.lengths))
        batches = []
        for start in range(0, len(order), self.pool):
            pool = order[start : start + self.pool]
            pool = pool[np.argsort(self.lengths[pool], kind="stable")]
            batches += [
                pool[i : i + self.batch_size].tolist() for i in range(0, len(pool), self.batch_size)
            ]
        return iter([batches[i] for i in rng.permutation(len(batches))])


class ShardedBatches(Sampler[list[int]]):
    """One rank's share of every batch of a global batch sampler (a fine-tune across devices).

    Every rank draws the same global batches (same generator state) and takes the examples
    ``rank, rank + world, ...`` of each, so the global batch is ``sft.batch_size`` on any number
    of devices and every rank takes the same number of optimizer steps. A batch with fewer
    examples than ranks (a short last batch) is skipped by all ranks.

    Args:
        batches: The global batch sampler.
        rank: This process's rank.
        world: Number of ranks.
    """

    def __init__(self, batches: Sampler[list[int]], rank: int, world: int) -> None:
        self.batches, self.rank, self.world = batches, rank, world

    def __len__(self) -> int:
        return len(self.batches)  # an upper bound: short batches are skipped

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.batches:
            if len(batch) >= self.world:
                yield batch[self.rank :: self.world]


def built_dataloader(
    frames: np.ndarray,
    built: BuiltSet,
    batch_size: int,
    rng: Callable[[], np.random.Generator],
    bucket_by_length: bool = True,
    shard: tuple[int, int] | None = None,
) -> DataLoader:
    """Batches of the built set, reshuffled every epoch, as ``collate(frames, targets, weights)``.

    Args:
        frames: ``(N, H, W, 3)`` frames of D_f.
        built: The built set (at least one example).
        batch_size: Examples per batch; the last batch may be smaller.
        rng: Returns the generator that shuffles each epoch.
        bucket_by_length: Batch examples of similar target length (:class:`LengthBuckets`);
            ``False`` draws batches from one plain permutation.
        shard: ``(rank, world)``: serve this rank's share of each batch (:class:`ShardedBatches`).

    Returns:
        A single-process ``DataLoader``: each epoch serves every example once (across ranks).
    """

    def collate_rows(items: list[tuple[np.ndarray, str, float]]) -> dict:
        rows, targets, weights = zip(*items, strict=True)
        return built.collate(list(rows), list(targets), np.asarray(weights, dtype=np.float64))

    rows = BuiltRows(frames, built)
    if bucket_by_length:
        lengths = np.array([len(target) for target in built.targets])
        batches: Sampler[list[int]] = LengthBuckets(rng, lengths, batch_size)
    else:
        batches = BatchSampler(SeededShuffle(rng, len(rows)), batch_size, drop_last=False)
    if shard is not None:
        batches = ShardedBatches(batches, *shard)
    return DataLoader(rows, batch_sampler=batches, num_workers=0, collate_fn=collate_rows)
