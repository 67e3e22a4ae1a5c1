"""Ctrl-C and SIGTERM during training: a request the loop honours at its next safe point.

A ``KeyboardInterrupt`` raised wherever the signal lands can cut through a library mid-write:
MLflow's SQLite store, interrupted inside a transaction, keeps the database locked, and the
run's final status then fails to write. Inside :func:`deferred_interrupts` the first signal only
records the request; the loop calls :func:`raise_if_stop_requested` between agent steps and
after each VLM fine-tune, where its state is whole, and the usual path follows (checkpoint, run
marked ``KILLED``, exit 130). A second signal stops at once, for a user who will not wait.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_HANDLED = (signal.SIGINT, signal.SIGTERM)
_requested: list[str] = []


def stop_requested() -> bool:
    """Whether Ctrl-C or SIGTERM arrived inside :func:`deferred_interrupts` and is not yet honoured."""
    return bool(_requested)


def raise_if_stop_requested() -> None:
    """Raise ``KeyboardInterrupt`` if a stop was requested (call only where the state is whole)."""
    if _requested:
        _requested.clear()
        raise KeyboardInterrupt


def _request_stop(signum: int, frame) -> None:
    if _requested:  # the second signal: stop now, wherever we are
        raise KeyboardInterrupt
    _requested.append(signal.Signals(signum).name)


@contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Turn Ctrl-C and SIGTERM into stop requests for the duration of the block.

    Outside the main thread (where Python cannot install signal handlers) the block changes
    nothing: signals then reach the main thread's own handlers as before.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in _HANDLED}
    _requested.clear()
    for sig in _HANDLED:
        signal.signal(sig, _request_stop)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _requested.clear()
