"""Guidance off the agent's critical path: a guide answering on its own thread.

The agent hands each query (the frames and observations of the envs that ask now) to
:meth:`GuideWorker.submit` and steps on. The worker thread answers in batches: it waits until
``min_batch`` frames have queued (or the agent asks for everything, :meth:`GuideWorker.drain`),
and every further query that queued meanwhile joins, up to ``max_batch``. A VLM's ``generate``
costs nearly the same for 16 frames as for one, so batching is what makes asking every frame
affordable; the price is lag, which the loop logs. The loop collects the answers with
:meth:`GuideWorker.poll` at its next step and writes each into the transitions that were stored
while it was on the way (:mod:`covr_lightning.loop.covr_loop`).

Threads, not processes: the guide keeps sharing the VLM's weights with the fine-tune, which runs
only after :meth:`GuideWorker.drain` (no query in flight), and torch releases the GIL inside its
kernels. On CUDA the worker runs the guide on its own stream, so its kernels overlap the
agent's update instead of queueing behind it.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from covr_lightning.guides.base import Guide

__all__ = ["Answer", "GuideWorker", "auto_min_batch"]


@dataclass(frozen=True)
class Answer:
    """The guide's answer to one frame of one query.

    Attributes:
        ticket: The ticket the frame was submitted with.
        action: a_v, float32 ``(A,)``.
        valid: Whether the answer could be read (a VLM's text parsed to an action).
    """

    ticket: int
    action: np.ndarray
    valid: bool


LAG_BUDGET_AGENT_STEPS = 32
"""How long (agent steps) the automatic ``min_batch`` lets the first frame of a batch wait."""


def auto_min_batch(
    guide_every: int, num_envs: int, max_batch: int, lag_agent_steps: int = LAG_BUDGET_AGENT_STEPS
) -> int:
    """The ``min_batch`` that fills in about ``lag_agent_steps`` agent steps (1 to ``max_batch``).

    Queries bring ``num_envs`` frames every ``guide_every`` agent steps. Asking every frame, a
    fixed small batch pays ``generate``'s per-call cost many times a round (the tiny VLM on one
    CPU thread: 64 ms per frame alone, 11.5 ms in a batch of 8, 5.3 ms in a batch of 32,
    ``benchmarks/vlm_guide.py``); asking every 10th frame, a fixed large batch makes
    answers wait hundreds of steps. Sizing the batch by the time it takes to fill keeps the lag
    about the same at every cadence and batches as much as that lag allows.
    """
    frames = -(-lag_agent_steps * num_envs // guide_every)  # ceil
    return max(1, min(max_batch, frames))


_FLUSH = "flush"  # queued by drain(): answer what has queued without waiting for min_batch


@dataclass
class _Request:
    tickets: list[int]
    frames: np.ndarray
    obs: np.ndarray


class GuideWorker:
    """Runs :meth:`Guide.propose` on a background thread; answers arrive later.

    Args:
        guide: The guide that answers (its ``propose`` runs on the worker thread only).
        min_batch: Frames to collect before a ``propose`` call (:meth:`drain` sends fewer).
        max_batch: At most this many frames per ``propose`` call (a single larger query is
            answered whole).
        device: The guide model's device; on CUDA the worker gets its own stream.
        threads: Intra-op threads of the worker's CPU kernels (``None``: torch's default). On a
            CPU the agent's update and the guide share the cores; one thread for the guide keeps
            the update from waiting for cores the guide holds.

    Attributes:
        busy_seconds: Time the worker spent answering since the last :meth:`pop_stats`.
        calls: ``propose`` calls since then; ``frames``: frames answered since then.
    """

    def __init__(
        self,
        guide: Guide,
        min_batch: int = 1,
        max_batch: int = 32,
        device: torch.device | str | None = None,
        threads: int | None = 1,
    ) -> None:
        if not 1 <= min_batch <= max_batch:
            raise ValueError(f"need 1 <= min_batch <= max_batch, got {min_batch} and {max_batch}")
        self.guide = guide
        self.min_batch = min_batch
        self.max_batch = max_batch
        self.threads = threads
        device = torch.device(device) if device is not None else None
        self._stream = (
            torch.cuda.Stream(device) if device is not None and device.type == "cuda" else None
        )
        self._requests: queue.SimpleQueue[_Request | str | None] = queue.SimpleQueue()
        self._answers: queue.SimpleQueue[Answer] = queue.SimpleQueue()
        self._pending = 0  # frames submitted and not yet collected (main thread only)
        self._error: BaseException | None = None
        self._lock = threading.Lock()  # guards the statistics below
        self.busy_seconds = 0.0
        self.calls = 0
        self.frames = 0
        self._thread = threading.Thread(target=self._serve, name="covr-guide", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ agent side
    @property
    def pending(self) -> int:
        """Frames submitted whose answers have not been collected yet."""
        return self._pending

    def submit(self, tickets: Sequence[int], frames: np.ndarray, obs: np.ndarray) -> None:
        """Queue one query (its frames and observations) and return at once.

        Args:
            tickets: One id per frame; its :class:`Answer` carries it back.
            frames: uint8 ``(B, H, W, 3)``.
            obs: ``(B, *obs_shape)``.

        Raises:
            RuntimeError: If the worker stopped on an error or was closed.
        """
        self._raise_if_failed()
        if not self._thread.is_alive():
            raise RuntimeError("the guide worker is closed")
        frames, obs = np.asarray(frames), np.asarray(obs)
        if not (len(tickets) == len(frames) == len(obs)):
            raise ValueError(
                f"{len(tickets)} tickets, {len(frames)} frames and {len(obs)} observations"
            )
        # Copies: the loop reuses its arrays at the next step, while the worker reads these later.
        self._requests.put(_Request(list(tickets), frames.copy(), obs.copy()))
        self._pending += len(tickets)

    def poll(self) -> list[Answer]:
        """The answers that have arrived (possibly none); never waits.

        Raises:
            Exception: The guide's own error, if it failed on the worker thread.
        """
        answers = []
        while True:
            try:
                answers.append(self._answers.get_nowait())
            except queue.Empty:
                break
        self._pending -= len(answers)
        self._raise_if_failed()
        return answers

    def drain(self) -> list[Answer]:
        """Wait for every submitted frame's answer; the worker is idle afterwards.

        Raises:
            Exception: The guide's own error, if it failed on the worker thread.
        """
        answers = []
        if self._pending:
            self._requests.put(_FLUSH)  # answer what has queued, however few
        while self._pending:
            self._raise_if_failed()
            try:
                answers.append(self._answers.get(timeout=0.1))
            except queue.Empty:
                continue
            self._pending -= 1
        return answers

    def pop_stats(self) -> dict[str, float]:
        """Worker time, calls and frames since the last call (then reset)."""
        with self._lock:
            stats = {"busy_seconds": self.busy_seconds, "calls": self.calls, "frames": self.frames}
            self.busy_seconds, self.calls, self.frames = 0.0, 0, 0
        return stats

    def close(self) -> None:
        """Stop the thread (pending queries are dropped)."""
        if self._thread.is_alive():
            self._requests.put(None)
            self._thread.join(timeout=60)

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            self._pending = 0
            raise error

    # ------------------------------------------------------------------ worker side
    def _serve(self) -> None:
        if self.threads is not None:
            # Per-thread: OpenMP's thread count is a property of the calling thread.
            torch.set_num_threads(self.threads)
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            start = time.perf_counter()
            try:
                with self._on_stream():
                    actions, valid = self.guide.propose(
                        np.concatenate([r.frames for r in batch]),
                        np.concatenate([r.obs for r in batch]),
                    )
            except BaseException as error:  # handed to the agent's thread, raised there
                self._error = error
                return
            with self._lock:
                self.busy_seconds += time.perf_counter() - start
                self.calls += 1
                self.frames += len(valid)
            tickets = [ticket for r in batch for ticket in r.tickets]
            for ticket, action, ok in zip(tickets, actions, valid, strict=True):
                self._answers.put(Answer(ticket, np.asarray(action, np.float32), bool(ok)))

    def _next_batch(self) -> list[_Request] | None:
        """At least ``min_batch`` frames (fewer after a flush), then what else queued, up to
        ``max_batch``; ``None`` once closed."""
        batch: list[_Request] = []
        size = 0
        while size < self.min_batch:  # wait for enough frames
            item = self._requests.get()
            if item is None:  # close: answer nothing more
                return None
            if item is _FLUSH:
                if batch:
                    break
                continue
            batch.append(item)
            size += len(item.tickets)
        while size < self.max_batch:  # take what else has queued, without waiting
            try:
                item = self._requests.get_nowait()
            except queue.Empty:
                break
            if item is None:
                self._requests.put(None)  # answer this batch, then stop
                break
            if item is _FLUSH:
                continue
            batch.append(item)
            size += len(item.tickets)
        return batch

    def _on_stream(self) -> contextlib.AbstractContextManager:
        if self._stream is None:
            return contextlib.nullcontext()
        return torch.cuda.stream(self._stream)
