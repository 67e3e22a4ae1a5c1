"""Print VLM figures for a backbone: guidance latency per frame, one RALW SFT step, memory.

    python benchmarks/vlm_guide.py                                  # tiny backbone, CUDA if present
    python benchmarks/vlm_guide.py --backbone qwen2.5-vl-3b --device cuda --batch-sizes 1,8,32
    python benchmarks/vlm_guide.py --device cpu --repeats 1 --frames random

Figures (DMC cheetah run: its task prompt, a 6-actuator numeric codec, frames rendered by DMCEnv
at --image-size after a few random steps):
  guidance  ms per frame of ``VLMGuide.propose`` at each batch size, after one warm-up call, split into
            image + text processing, ``generate`` and other (inputs to the device, batch decode,
            codec decode); generation budget (max_new_tokens), longest generation, invalid answers
  prompt    tokens of one prompt, and how many of them are image tokens
  sft       one RALW step at --sft-batch rows: ``VLMLoRAModule.training_step`` on an
            ``encode_sft_batch`` batch (forward), backward, AdamW step; after one warm-up step
  lora      trainable share of the parameters
  memory    CUDA: peak allocated during guidance and during SFT; CPU: peak RSS of the process
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from types import SimpleNamespace

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

PAPER_SECONDS_PER_INFERENCE = 4.4  # COVR paper, Qwen2.5-VL-3B guidance


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class TimedProcessor:
    """The backbone's processor, with the time spent in ``__call__`` (image + text) added up."""

    def __init__(self, processor) -> None:
        self._processor = processor
        self.seconds = 0.0

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        out = self._processor(*args, **kwargs)
        self.seconds += time.perf_counter() - start
        return out

    def __getattr__(self, name):
        return getattr(self._processor, name)


class TimedModel:
    """The VLM, with the time spent in ``generate`` and the longest generation recorded."""

    def __init__(self, model, device: torch.device) -> None:
        self._model = model
        self._device = device
        self.seconds = 0.0
        self.longest = 0

    def generate(self, **inputs):
        sync(self._device)
        start = time.perf_counter()
        output = self._model.generate(**inputs)
        sync(self._device)
        self.seconds += time.perf_counter() - start
        self.longest = max(self.longest, output.shape[1] - inputs["input_ids"].shape[1])
        return output

    def __getattr__(self, name):
        return getattr(self._model, name)


def cheetah_frames(count: int, size: int, kind: str) -> tuple[np.ndarray, np.ndarray, str, str]:
    """(frames uint8 (count, size, size, 3), action low, action high, what the frames are)."""
    from covr_lightning.envs.dmc import TASK_DESCRIPTIONS

    task = TASK_DESCRIPTIONS["cheetah"]
    low, high = -np.ones(6, np.float32), np.ones(6, np.float32)
    rng = np.random.default_rng(0)
    if kind == "render":
        try:
            from covr_lightning.envs.dmc import DMCEnv

            env = DMCEnv(domain="cheetah", task="run", seed=0)
            env.reset()
            frames = []
            for _ in range(count):
                for _ in range(3):  # a few random agent steps between renders
                    env.step(rng.uniform(-1, 1, env.action_space.shape).astype(np.float32))
                frames.append(env.render(size, size))
            low, high = env.action_space.low, env.action_space.high
            env.close()
            return np.stack(frames), low, high, task
        except Exception as error:  # no GL backend here: random frames still time the VLM
            print(
                f"note: cheetah rendering failed ({type(error).__name__}: {error}); random frames"
            )
    frames = rng.integers(0, 256, (count, size, size, 3), dtype=np.uint8)
    return frames, low, high, task


def read_at(processor, inputs) -> str:
    """ ", read at H x W px" for Qwen-style processors (which resize to their pixel budget)."""
    grid = inputs.get("image_grid_thw")
    patch = getattr(getattr(processor, "image_processor", None), "patch_size", None)
    if grid is None or patch is None:
        return ""
    return f", read at {int(grid[0][1]) * patch}x{int(grid[0][2]) * patch}px"


def peak_rss_mib() -> float:
    """Peak resident memory of this process (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="tiny-qwen2.5-vl")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--image-size", type=int, default=224, help="VLM render size (px)")
    parser.add_argument("--batch-sizes", default="1,32", help="guidance batch sizes")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per measurement")
    parser.add_argument("--lora-rank", type=int, default=None, help="default: 16 tiny, 128 else")
    parser.add_argument("--lora-alpha", type=float, default=16.0)
    parser.add_argument("--sft-batch", type=int, default=8)
    parser.add_argument("--quantization", choices=["4bit"], default=None)
    parser.add_argument("--frames", choices=["render", "random"], default="render")
    args = parser.parse_args()

    from transformers.utils import logging as hf_logging

    from covr_lightning.vlm.codecs import make_codec
    from covr_lightning.vlm.guide import VLMGuide
    from covr_lightning.vlm.module import VLMLoRAModule
    from covr_lightning.vlm.prompting import ActionPrompt, encode_sft_batch
    from covr_lightning.vlm.tiny import TINY_NAME

    console = Console()
    if not console.is_terminal:  # piped to a file: do not wrap the table at 80 columns
        console = Console(width=120)
    hf_logging.disable_progress_bar()
    batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    device = torch.device(args.device)
    rank = args.lora_rank or (16 if args.backbone == TINY_NAME else 128)
    frames, low, high, task = cheetah_frames(
        max([*batch_sizes, args.sft_batch]), args.image_size, args.frames
    )

    start = time.perf_counter()
    vlm = VLMLoRAModule(
        args.backbone,
        lora_rank=rank,
        lora_alpha=args.lora_alpha,
        device=str(device),
        quantization=args.quantization,
    )
    load_seconds = time.perf_counter() - start
    dtype = next(p for p in vlm.model.parameters() if p.is_floating_point()).dtype
    codec = make_codec("numeric", low, high)
    prompt = ActionPrompt(task, codec.describe())
    processor = TimedProcessor(vlm.processor)
    model = TimedModel(vlm.model, device)
    guide = VLMGuide(SimpleNamespace(model=model, processor=processor), prompt, codec)

    console.print(
        f"backbone {args.backbone} on {device} ({str(dtype).removeprefix('torch.')}"
        f"{', 4-bit' if args.quantization else ''}), frames {args.image_size}px "
        f"({'DMC cheetah renders' if args.frames == 'render' else 'random'}), torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads, loaded in {load_seconds:.1f} s"
    )
    if vlm.is_tiny:
        console.print(
            "[bold yellow]tiny-qwen2.5-vl is a tiny, randomly initialised test model: these "
            "timings measure the framework overhead only, not a real VLM.[/]"
        )

    table = Table(title=f"VLM guidance and fine-tuning, {args.backbone}")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_column("detail")

    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    for batch in batch_sizes:
        chunk = frames[:batch]
        guide.propose(chunk)  # warm-up
        guide.pop_invalid_rate()
        processor.seconds = model.seconds = 0.0
        sync(device)
        start = time.perf_counter()
        for _ in range(args.repeats):
            guide.propose(chunk)
        sync(device)
        total = time.perf_counter() - start
        per_frame = 1000 / (batch * args.repeats)
        invalid = guide.pop_invalid_rate() or 0.0
        rest = total - processor.seconds - model.seconds
        table.add_row(
            f"propose, batch {batch}",
            f"{total * per_frame:.1f} ms/frame",
            f"processing {processor.seconds * per_frame:.1f} + generate "
            f"{model.seconds * per_frame:.1f} + other {rest * per_frame:.1f} ms; "
            f"invalid {100 * invalid:.0f} %",
        )
    table.add_row(
        "generated tokens",
        f"{guide.max_new_tokens}",
        f"max_new_tokens (codec's longest answer + 4); longest generation {model.longest}",
    )
    config = vlm.model.config
    image_token = getattr(config, "image_token_id", None) or getattr(config, "image_token_index", 0)
    one = vlm.processor(text=[guide.prompt_text], images=[frames[0]], return_tensors="pt")
    table.add_row(
        "prompt tokens",
        f"{one['input_ids'].shape[1]}",
        f"{int((one['input_ids'] == image_token).sum())} of them image tokens "
        f"({args.image_size}px frame{read_at(vlm.processor, one)})",
    )
    guide_peak = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None

    rows = args.sft_batch
    rng = np.random.default_rng(1)
    targets = [codec.encode(rng.uniform(low, high)) for _ in range(rows)]
    weights = rng.uniform(0.1, 1.0, rows)
    batch = encode_sft_batch(vlm.processor, guide.prompt_text, frames[:rows], targets, weights)
    batch = {k: v.to(device) for k, v in batch.items()}
    optimizer = vlm.configure_optimizers()
    vlm.train()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    forward = backward = step = 0.0
    for repeat in range(args.repeats + 1):  # the first is a warm-up
        sync(device)
        t0 = time.perf_counter()
        loss = vlm.training_step(batch)
        sync(device)
        t1 = time.perf_counter()
        loss.backward()
        sync(device)
        t2 = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        t3 = time.perf_counter()
        if repeat > 0:
            forward, backward, step = forward + t1 - t0, backward + t2 - t1, step + t3 - t2
    vlm.eval()
    ms = 1000 / args.repeats
    table.add_row(
        f"SFT step, batch {rows}",
        f"{(forward + backward) * ms:.0f} ms",
        f"forward {forward * ms:.0f} + backward {backward * ms:.0f} ms (RALW loss, "
        f"{batch['input_ids'].shape[1]} tokens per row); then AdamW step {step * ms:.0f} ms",
    )
    table.add_row(
        "trainable share",
        f"{100 * vlm.trainable_share:.2f} %",
        f"LoRA r={rank} alpha={args.lora_alpha:g}: {vlm.trainable_parameters:,} of "
        f"{vlm.total_parameters:,} parameters",
    )
    if cuda:
        sft_peak = torch.cuda.max_memory_allocated(device) / 2**20
        table.add_row(
            "peak memory", f"{max(guide_peak, sft_peak):,.0f} MiB",
            f"torch.cuda.max_memory_allocated: guidance {guide_peak:,.0f}, SFT {sft_peak:,.0f} MiB",
        )  # fmt: skip
    else:
        table.add_row(
            "peak memory", f"{peak_rss_mib():,.0f} MiB", "peak RSS of the whole process (ru_maxrss)"
        )
    console.print(table)
    console.print(
        f"For context: the COVR paper reports {PAPER_SECONDS_PER_INFERENCE} s per inference for "
        "its 3B model (Qwen2.5-VL-3B)."
    )


if __name__ == "__main__":
    main()
