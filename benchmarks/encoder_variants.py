"""Print what four memory-traffic levers would save in the pixel encoder's share of an update.

    python benchmarks/encoder_variants.py                   # RAD's encoder, batch 128, 84 px, bf16
    python benchmarks/encoder_variants.py --repeats 3 --steps 20

The profile in docs/performance.md puts a third of a pixel SAC update in memory-bound work around
the convolutions (ReLU forward and backward, copies). Each variant below computes the same
function as :class:`~covr_lightning.policies.networks.PixelEncoder` under ``bf16`` (up to rounding,
and up to a fixed permutation of the fc layer's inputs for ``nhwc-flatten``) and removes one pass
over the activations:

- ``inplace-relu``: ``nn.ReLU(inplace=True)``, no new tensor per ReLU.
- ``nhwc-flatten``: flatten the channels-last conv output in its memory order (a view), instead
  of the NCHW order that copies it before the fc layer.
- ``fold-scale``: the 1/255 pixel scale applied to the first conv's weights in the forward
  (``conv(x, W / 255) = conv(x / 255, W)``; W stays the parameter, so Adam sees the same
  problem), no pass over the input batch.
- ``fused``: each conv and its ReLU in one oneDNN call
  (:func:`covr_lightning.policies.fused_conv.conv_relu`; bit-identical, so no rounding either),
  no pass over each conv's output. ``nhwc + fold + fused`` is what PixelEncoder runs.

One step is what an update asks of the encoder: two no-grad forwards (s' through the online and
the target encoder) and one forward+backward (s, the critic's pass), on random uint8 frames.
Settings alternate (A B C ... A B C ...) so drift in the machine's speed hits all of them alike.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from covr_lightning.policies.fused_conv import conv_relu, fused_conv_relu_available

SETTINGS = {
    "baseline": {},
    "inplace-relu": {"inplace": True},
    "nhwc-flatten": {"nhwc": True},
    "fold-scale": {"fold": True},
    "nhwc + fold": {"nhwc": True, "fold": True},
    "all three": {"inplace": True, "nhwc": True, "fold": True},
    "nhwc + fold + fused": {"nhwc": True, "fold": True, "fused": True},
}


class Encoder(nn.Module):
    """RAD's 4-layer encoder (as PixelEncoder) with the levers as switches."""

    def __init__(
        self,
        channels: int,
        size: int,
        inplace: bool = False,
        nhwc: bool = False,
        fold: bool = False,
        fused: bool = False,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(channels, 32, 3, stride=2), nn.ReLU(inplace)]
        for _ in range(3):
            layers += [nn.Conv2d(32, 32, 3), nn.ReLU(inplace)]
        self.convs = nn.Sequential(*layers).to(memory_format=torch.channels_last)
        side = (size - 3) // 2 + 1 - 6
        self.fc = nn.Linear(32 * side * side, 50)
        self.ln = nn.LayerNorm(50)
        self.nhwc, self.fold, self.fused = nhwc, fold, fused

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        x = obs.contiguous(memory_format=torch.channels_last).to(torch.bfloat16, copy=True)
        if not self.fold:
            x = x.mul_(1 / 255.0)
        with torch.autocast(obs.device.type, dtype=torch.bfloat16):
            if self.fused:  # with fold: the scaled weight goes into the first fused call
                h = x
                for index, conv in enumerate(self.convs[::2]):
                    weight = conv.weight / 255.0 if index == 0 and self.fold else conv.weight
                    h = conv_relu(h, weight, conv.bias, conv.stride[0])
            elif self.fold:
                first = self.convs[0]
                h = nn.functional.conv2d(x, first.weight / 255.0, first.bias, first.stride)
                h = self.convs[1:](h)
            else:
                h = self.convs(x)
            h = h.permute(0, 2, 3, 1).flatten(1) if self.nhwc else h.flatten(1)
            h = self.fc(h)
        return torch.tanh(self.ln(h.float()))


def encoder_step(encoder: Encoder, obs: torch.Tensor, next_obs: torch.Tensor) -> None:
    """The encoder work of one SAC update: two no-grad forwards of s', one fwd+bwd of s."""
    with torch.no_grad():
        encoder(next_obs)
        encoder(next_obs)
    encoder(obs).square().mean().backward()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--size", type=int, default=84, help="frame side after the crop")
    parser.add_argument("--channels", type=int, default=9, help="3 stacked RGB frames")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per setting and pass")
    parser.add_argument("--repeats", type=int, default=3, help="passes over all settings")
    args = parser.parse_args()

    torch.manual_seed(0)
    shape = (args.batch_size, args.channels, args.size, args.size)
    obs = torch.randint(0, 256, shape, dtype=torch.uint8)
    next_obs = torch.randint(0, 256, shape, dtype=torch.uint8)
    encoders = {
        name: Encoder(args.channels, args.size, **flags) for name, flags in SETTINGS.items()
    }
    for encoder in encoders.values():  # warm-up: oneDNN picks its kernels on the first calls
        for _ in range(3):
            encoder_step(encoder, obs, next_obs)
    times: dict[str, list[float]] = {name: [] for name in SETTINGS}
    for _ in range(args.repeats):
        for name, encoder in encoders.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                encoder_step(encoder, obs, next_obs)
            times[name].append((time.perf_counter() - start) / args.steps * 1000)
    threads = torch.get_num_threads()
    print(f"encoder work of one update, batch {args.batch_size}, {shape[1:]}, {threads} threads")
    if not fused_conv_relu_available():
        print("(no exact fused conv+ReLU in this torch build: 'fused' ran the plain ops)")
    base = min(times["baseline"])
    for name, ms in times.items():
        passes = " / ".join(f"{t:.1f}" for t in ms)
        print(f"{name:>19}: {passes} ms per step (best {min(ms) / base:.2f} x baseline's best)")


if __name__ == "__main__":
    main()
