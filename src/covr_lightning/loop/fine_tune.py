"""The VLM phase's optimizer steps: in the training process, or across devices through Fabric.

:func:`sft_steps` is the step loop (``sft_epochs`` passes, repeated up to the ``sft_min_steps``
floor, never past ``sft_max_steps``), the same wherever it runs. ``covr.sft_strategy: single``
runs it in the training process on the VLM's device. ``ddp`` / ``fsdp`` run it in
``covr.sft_devices`` processes spawned for the fine-tune (:func:`fine_tune_across_devices`):
each builds the VLM from the recipe, loads the current adapter, wraps it in the Fabric strategy
and trains on its share of every global batch; rank 0 writes the new adapter, which the training
process loads. The policy, the replay buffer and the guide stay where they are.

Why spawned processes rather than launching the whole run under ``torchrun``: the RL phase is
one process on one device, so N ranks would sit idle through every RL phase (hours at paper
settings, past collective timeouts); spawning per fine-tune costs each rank one load of the base
weights per round instead. The SFT set travels through a folder (the frames as one ``.npy``
every rank memory-maps), not through pickles, so N ranks do not hold N copies of it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from covr_lightning.errors import ConfigError, TrainingDivergedError

Strategy = str
"""``ddp`` or ``fsdp`` (``covr.sft_strategy``)."""


@dataclass(frozen=True)
class SFTBudget:
    """How long one fine-tune trains (the ``covr.sft_*`` settings).

    Attributes:
        epochs: Passes over the SFT set.
        min_steps: Floor on optimizer steps: passes repeat until it is reached (0: none).
        max_steps: Cap on optimizer steps (0: none).
        grad_clip: Gradient-norm clip of the adapter (0: off).
    """

    epochs: int
    min_steps: int
    max_steps: int
    grad_clip: float


@dataclass
class SFTTotals:
    """What one rank's step loop did: metric sums over steps, counts and its wall time."""

    sums: dict[str, float]
    steps: int
    passes: int
    tokens: int
    slots: int
    seconds: float

    def metrics(self) -> dict[str, float]:
        """Mean metrics of the fine-tune plus ``vlm/sft_steps``, tokens/s and the padding share."""
        metrics = {key: value / max(self.steps, 1) for key, value in self.sums.items()}
        metrics["vlm/sft_steps"] = float(self.steps)
        metrics["vlm/sft_passes"] = float(self.passes)
        # Throughput over real tokens (prompt, image and answer; padding excluded).
        metrics["vlm/sft_tokens_per_s"] = self.tokens / max(self.seconds, 1e-9)
        metrics["vlm/sft_padding_frac"] = 1 - self.tokens / max(self.slots, 1)
        return metrics


def sft_steps(
    training_step: Callable[[dict[str, Tensor], int], Tensor],
    step_metrics: Callable[[], dict[str, float]],
    optimizer: torch.optim.Optimizer,
    epoch: Callable[[], Iterable[dict[str, Tensor]]],
    budget: SFTBudget,
    device: torch.device,
    clip: Callable[[float], Any],
    backward: Callable[[Tensor], Any] = Tensor.backward,
    env_step: int = 0,
) -> SFTTotals:
    """Run the fine-tune's optimizer steps.

    Args:
        training_step: ``(batch, step) -> loss`` (the VLM module's, or its Fabric wrapper's).
        step_metrics: The metrics of the last step (summed into the totals).
        optimizer: The adapter's optimizer.
        epoch: A fresh pass of batches (reshuffled) per call.
        budget: Passes, floor, cap and clip.
        device: Where the batches go.
        clip: ``max_norm -> None``: clip the adapter's gradients (sharded strategies clip their
            own way).
        backward: ``loss -> None`` (``Tensor.backward``, or the Fabric strategy's).
        env_step: The run's env step, for the divergence message.

    Raises:
        TrainingDivergedError: The loss is not finite.
    """
    sums: dict[str, float] = {}
    steps = passes = tokens = slots = 0
    capped = exhausted = False
    start = time.perf_counter()
    while not (capped or exhausted) and (passes < budget.epochs or steps < budget.min_steps):
        passes += 1
        exhausted = True  # a pass that yields no batch (a shard of a tiny set) ends the loop
        for batch in epoch():
            exhausted = False
            mask = batch["attention_mask"]
            tokens, slots = tokens + int(mask.sum()), slots + mask.numel()
            batch = {k: v.to(device) for k, v in batch.items()}
            loss = training_step(batch, steps)
            if not torch.isfinite(loss):
                raise TrainingDivergedError(
                    f"VLM fine-tuning diverged: vlm/sft_loss is {loss.item()} at env step "
                    f"{env_step:,}",
                    "lower vlm.lr, or continue from the last checkpoint with --resume last",
                )
            optimizer.zero_grad(set_to_none=True)
            backward(loss)
            if budget.grad_clip > 0:
                clip(budget.grad_clip)
            optimizer.step()
            for key, value in step_metrics().items():
                sums[key] = sums.get(key, 0.0) + value
            steps += 1
            capped = bool(budget.max_steps) and steps >= budget.max_steps
            if capped:
                break
    return SFTTotals(sums, steps, passes, tokens, slots, time.perf_counter() - start)


# --------------------------------------------------------------------------- across devices


@dataclass
class FineTuneJob:
    """Everything a rank needs, written by the training process into the job folder.

    Attributes:
        vlm_class: ``vlm.class_path``.
        vlm_args: ``vlm.init_args`` (``device`` is set per rank).
        adapter: The adapter's current weights (CPU tensors).
        prompt_text: The rendered prompt every SFT row is encoded with.
        targets: Target text per example.
        weights: RALW weight per example.
        batch_size: The global batch (``sft.batch_size``).
        bucket_by_length: Length-bucketed batches (``sft.bucket_by_length``).
        rng_state: The SFT generator's state: every rank draws the same global batches.
        budget: Passes, floor, cap, clip.
        seed: Base of each rank's torch seed (LoRA dropout), rank added.
        env_step: The run's env step (messages).
    """

    vlm_class: str
    vlm_args: dict[str, Any]
    adapter: dict[str, Tensor]
    prompt_text: str
    targets: list[str]
    weights: np.ndarray
    batch_size: int
    bucket_by_length: bool
    rng_state: dict[str, Any]
    budget: SFTBudget
    seed: int
    env_step: int


@dataclass
class FineTuneResult:
    """What rank 0 hands back: the new adapter, the metrics and the generator's final state."""

    adapter: dict[str, Tensor]
    metrics: dict[str, float]
    rng_state: dict[str, Any]


def check_devices(strategy: str, devices: int, accelerator: str) -> None:
    """Refuse a multi-device fine-tune this machine cannot run, before the run starts.

    Raises:
        ConfigError: ``single`` with several devices, ``fsdp`` without CUDA, or more CUDA
            devices than there are.
    """
    if strategy == "single":
        if devices != 1:
            raise ConfigError(
                f"covr.sft_devices={devices} needs covr.sft_strategy=ddp or fsdp",
                "set covr.sft_strategy=ddp (or fsdp for a VLM that does not fit one device)",
            )
        return
    if strategy == "fsdp" and not _use_cuda(accelerator):
        raise ConfigError(
            "covr.sft_strategy=fsdp needs CUDA devices (Lightning's FSDP runs on GPUs only)",
            "use covr.sft_strategy=ddp for processes on this machine's CPU",
        )
    if _use_cuda(accelerator) and devices > torch.cuda.device_count():
        raise ConfigError(
            f"covr.sft_devices={devices} but this machine has {torch.cuda.device_count()} CUDA "
            "device(s)",
            f"set covr.sft_devices to at most {torch.cuda.device_count()}",
        )


def _use_cuda(accelerator: str) -> bool:
    return accelerator in ("cuda", "gpu") or (accelerator == "auto" and torch.cuda.is_available())


def fine_tune_across_devices(
    job: FineTuneJob,
    frames: np.ndarray,
    strategy: Strategy,
    devices: int,
    accelerator: str,
    folder: Path,
) -> FineTuneResult:
    """Run one fine-tune in ``devices`` spawned processes under a Fabric strategy.

    Args:
        job: The adapter, the SFT set (but its frames) and the budget.
        frames: ``(M, H, W, 3)`` frames of the SFT examples.
        strategy: ``ddp`` or ``fsdp``.
        devices: Number of processes (one per device).
        accelerator: ``run.accelerator``: CUDA devices 0..N-1 when it resolves to CUDA, else CPU
            processes on gloo.
        folder: A scratch folder for the job (removed afterwards).

    Returns:
        Rank 0's result.

    Raises:
        torch.multiprocessing.ProcessRaisedException: A rank failed (its traceback included).
    """
    import torch.multiprocessing as mp

    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    try:
        np.save(folder / "frames.npy", np.ascontiguousarray(frames))
        torch.save(job, folder / "job.pt")
        cuda = _use_cuda(accelerator)
        mp.start_processes(
            _rank_main,
            args=(str(folder), strategy, devices, cuda, _free_port(), _threads_per_rank(devices)),
            nprocs=devices,
            start_method="spawn",  # CUDA is already initialised here: fork is unsafe
        )
        return torch.load(folder / "result.pt", weights_only=False)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _threads_per_rank(devices: int) -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // devices)


def _rank_main(
    rank: int, folder: str, strategy: Strategy, devices: int, cuda: bool, port: int, threads: int
) -> None:
    """One rank: join the process group, train on its shard of each batch, rank 0 writes back."""
    from lightning import Fabric

    from covr_lightning.config import import_class
    from covr_lightning.data.sft_build import BuiltSet
    from covr_lightning.data.sft_loader import built_dataloader
    from covr_lightning.vlm.prompting import encode_sft_batch

    # Ctrl-C in a terminal reaches the whole process group; the training process decides when
    # to stop (after the fine-tune, loop/interrupt.py), so the ranks finish their steps.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # The processes exist already: Lightning's environment then only joins them into a group.
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        LOCAL_RANK=str(rank),
        NODE_RANK="0",
        WORLD_SIZE=str(devices),
    )
    torch.set_num_threads(threads)
    fabric = Fabric(
        accelerator="cuda" if cuda else "cpu",
        devices=devices,
        strategy=_fabric_strategy(strategy, cuda),
    )
    fabric.launch()
    job: FineTuneJob = torch.load(Path(folder) / "job.pt", weights_only=False)
    frames = np.load(Path(folder) / "frames.npy", mmap_mode="r")
    torch.manual_seed(job.seed + rank)

    vlm = import_class(job.vlm_class)(**{**job.vlm_args, "device": str(fabric.device)})
    vlm.load_adapter_state_dict(job.adapter)
    vlm.train()
    module = fabric.setup_module(vlm)
    optimizer = fabric.setup_optimizers(vlm.configure_optimizers())
    rng = np.random.Generator(np.random.PCG64())
    rng.bit_generator.state = job.rng_state
    built = BuiltSet(
        indices=np.arange(len(job.targets)),
        targets=job.targets,
        weights=job.weights,
        collate=lambda rows, targets, weights: encode_sft_batch(
            vlm.processor, job.prompt_text, rows, targets, weights
        ),
    )
    loader = built_dataloader(
        frames,
        built,
        job.batch_size,
        lambda: rng,
        bucket_by_length=job.bucket_by_length,
        shard=(fabric.global_rank, fabric.world_size),
    )
    totals = sft_steps(
        module.training_step,  # through the strategy's wrapper, so gradients synchronise
        lambda: vlm.last_metrics,
        optimizer,
        lambda: loader,
        job.budget,
        fabric.device,
        clip=lambda max_norm: fabric.clip_gradients(module, optimizer, max_norm=max_norm),
        backward=fabric.backward,
        env_step=job.env_step,
    )
    # Means over ranks (every rank took the same steps); tokens add up across ranks.
    metrics = totals.metrics()
    means = fabric.all_reduce(
        torch.tensor([totals.sums.get(k, 0.0) for k in sorted(totals.sums)], dtype=torch.float64),
        reduce_op="mean",
    )
    counts = fabric.all_reduce(
        torch.tensor([totals.tokens, totals.slots], dtype=torch.float64), reduce_op="sum"
    )
    for key, total in zip(sorted(totals.sums), means.tolist(), strict=True):
        metrics[key] = total / max(totals.steps, 1)
    metrics["vlm/sft_tokens_per_s"] = float(counts[0]) / max(totals.seconds, 1e-9)
    metrics["vlm/sft_padding_frac"] = 1 - float(counts[0]) / max(float(counts[1]), 1.0)
    metrics["vlm/sft_devices"] = float(fabric.world_size)
    adapter = _full_adapter_state(vlm, module, strategy)
    if fabric.global_rank == 0:
        result = FineTuneResult(adapter, metrics, rng.bit_generator.state)
        torch.save(result, Path(folder) / "result.pt")
    fabric.barrier()


def _fabric_strategy(strategy: Strategy, cuda: bool):
    from lightning.fabric.strategies import DDPStrategy, FSDPStrategy

    if strategy == "ddp":
        return DDPStrategy(process_group_backend="nccl" if cuda else "gloo")
    # Shard the base weights' decoder layers; LoRA's own parameters stay in their layers' units.
    return FSDPStrategy(
        process_group_backend="nccl" if cuda else "gloo",
        auto_wrap_policy=_decoder_layers,
        use_orig_params=True,  # the adapter's optimizer sees the LoRA parameters by name
    )


def _decoder_layers(module: torch.nn.Module, recurse: bool, nonwrapped_numel: int) -> bool:
    """FSDP wraps each transformer block (a ``*DecoderLayer`` / ``*VisionBlock``) as one unit."""
    if recurse:
        return True
    name = type(module).__name__
    return name.endswith("DecoderLayer") or name.endswith("VisionBlock")


def _full_adapter_state(vlm, module, strategy: Strategy) -> dict[str, Tensor]:
    """The adapter's full weights on every rank (FSDP gathers its shards first)."""
    if strategy != "fsdp":
        return vlm.adapter_state_dict()
    from torch.distributed.fsdp import FullyShardedDataParallel

    with FullyShardedDataParallel.summon_full_params(module._forward_module, writeback=False):
        return vlm.adapter_state_dict()
