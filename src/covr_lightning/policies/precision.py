"""Where the pixel encoder computes in bfloat16: only on hardware that runs it fast.

The encoder's convolutions are most of a pixel SAC update's arithmetic. bfloat16 keeps float32's
exponent range, so with float32 master weights (autocast casts a bf16 copy per forward, gradients
flow back into the float32 parameters) the encoder's features change by rounding only; the
Q-heads, the targets and every loss stay in float32, where TD targets need the precision
(bf16 resolves ~0.4 at a Q of 100).

Fast means native bf16 matrix units: AMX or AVX-512-BF16 on a CPU (measured on such a CPU: a
forward+backward of RAD's encoder at batch 128 took 67 ms in bf16 against 275 ms in float32),
and a CUDA device that supports bf16 (Ampere and later). Elsewhere bf16 is emulated and slower
than float32, so ``auto`` keeps float32 there.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Literal

import torch

EncoderPrecision = Literal["auto", "bf16", "fp32"]

_CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


@functools.cache
def cpu_has_fast_bf16() -> bool:
    """Whether this CPU has native bf16 units (AMX or AVX-512-BF16); False where unknown."""
    if not sys.platform.startswith("linux"):
        return False  # other systems: no cheap way to tell, and float32 is always right
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = next((line for line in text.splitlines() if line.startswith("flags")), "").split()
    return any(flag in flags for flag in _CPU_BF16_FLAGS)


@functools.cache
def fast_bf16(device_type: str) -> bool:
    """Whether devices of this type (``cpu``, ``cuda``, ...) compute bfloat16 natively."""
    if device_type == "cpu":
        return cpu_has_fast_bf16()
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return False


def use_bf16(precision: EncoderPrecision, device: torch.device) -> bool:
    """Resolve an encoder precision setting on a device: ``auto`` is bf16 where it is fast."""
    if precision == "auto":
        return fast_bf16(device.type)
    return precision == "bf16"
