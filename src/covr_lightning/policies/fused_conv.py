"""Convolution and ReLU in one oneDNN call, for the pixel encoder's bf16 update on a CPU.

At RAD's settings the encoder's ReLUs were the second-largest cost of an update (20 of 120 ms,
``benchmarks/throughput.py --profile``): each reads and writes a whole activation tensor that the
convolution has just written. oneDNN can apply the ReLU as the convolution's post-op while the
output is still in cache. PyTorch exposes that as ``torch.ops.mkldnn._convolution_pointwise``,
the op its own compiler (inductor) emits for CPU inference; it has no backward, so
:class:`_ConvReLU` supplies the one autograd would run for ``relu(conv(x))``: ReLU's mask from the
output, then ``aten.convolution_backward``.

Same numbers, not approximately the same: :func:`fused_conv_relu_available` runs both ways once
per process on a small bf16 batch and uses the fused op only if forward and all three gradients
are bit-identical; otherwise (an op that is missing in this torch build, a oneDNN that rounds
differently) every call takes the plain path. ``tests/policies/test_fused_conv.py`` checks the
identity at the encoder's real shapes. Measured by ``benchmarks/encoder_variants.py``.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["conv_relu", "fused_conv_relu_available"]

log = logging.getLogger(__name__)


class _ConvReLU(torch.autograd.Function):
    """``relu(conv2d(x, weight, bias, stride))`` (no padding, dilation 1, groups 1), fused."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, stride: int) -> Tensor:
        out = torch.ops.mkldnn._convolution_pointwise(
            x, weight, bias, [0, 0], [stride, stride], [1, 1], 1, "relu", [], ""
        )
        ctx.save_for_backward(x, weight, out)
        ctx.stride = stride
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, out = ctx.saved_tensors
        # What autograd runs for relu (mask from the output) and then for conv2d.
        grad_out = torch.ops.aten.threshold_backward(grad_out, out, 0)
        grad_x, grad_w, grad_b = torch.ops.aten.convolution_backward(
            grad_out,
            x,
            weight,
            [weight.shape[0]],
            [ctx.stride, ctx.stride],
            [0, 0],
            [1, 1],
            False,
            [0, 0],
            1,
            list(ctx.needs_input_grad[:3]),
        )
        return grad_x, grad_w, grad_b, None


def _plain(x: Tensor, weight: Tensor, bias: Tensor, stride: int) -> Tensor:
    return F.relu(F.conv2d(x, weight, bias, stride))


@functools.cache
def fused_conv_relu_available() -> bool:
    """Whether the fused op exists here and gives bit-identical results (checked once)."""
    if not (
        torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")
    ):
        return False
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (4, 9, 19, 19), generator=generator).to(torch.bfloat16)
    pixels = pixels.contiguous(memory_format=torch.channels_last)
    kernel = torch.randn(8, 9, 3, 3, generator=generator).to(torch.bfloat16)
    kernel = kernel.contiguous(memory_format=torch.channels_last)
    shift = torch.randn(8, generator=generator).to(torch.bfloat16)
    try:
        results = []
        # First called from inside an update: possibly under no_grad and autocast.
        with torch.enable_grad(), torch.autocast("cpu", enabled=False):
            for fn in (_plain, _ConvReLU.apply):
                x, weight, bias = (t.clone().requires_grad_() for t in (pixels, kernel, shift))
                out = fn(x, weight, bias, 2)
                out.float().mul(torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
                results.append([out, x.grad, weight.grad, bias.grad])
    except RuntimeError as error:  # the op exists but this build cannot run it
        log.debug("fused conv+ReLU unavailable: %s", error)
        return False
    return all(torch.equal(a, b) for a, b in zip(*results, strict=True))


def conv_relu(x: Tensor, weight: Tensor, bias: Tensor, stride: int) -> Tensor:
    """``relu(conv2d(x, weight, bias, stride))``: fused for bf16 on a CPU where that is exact.

    Args:
        x: ``(B, C, H, W)`` input; the fused path needs bf16 on the CPU, any other input takes
            the plain path.
        weight: The convolution's weight (cast to ``x``'s dtype on the fused path, as autocast
            casts it on the plain one).
        bias: The convolution's bias (cast likewise).
        stride: Stride of both spatial axes (no padding).
    """
    if x.device.type == "cpu" and x.dtype == torch.bfloat16 and fused_conv_relu_available():
        return _ConvReLU.apply(x, weight.to(x.dtype), bias.to(x.dtype), stride)
    return _plain(x, weight, bias, stride)
