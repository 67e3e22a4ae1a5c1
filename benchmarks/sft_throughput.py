"""Print fine-tuning throughput: tokens/s and padding share of SFT batches, bucketed by length or not.

    python benchmarks/sft_throughput.py                                 # dmc_cheetah codec, tiny VLM
    python benchmarks/sft_throughput.py --rows 512 --steps 40 sft.init_args.batch_size=16
    python benchmarks/sft_throughput.py --backbone qwen2.5-vl-3b vlm.init_args.device=cuda

D_f is filled with ``--rows`` rows: frames the recipe's env renders at ``covr.vlm_image_size``
after random steps, uniform random actions as targets (encoded by the env's codec, so answer
lengths vary as they do in training: signs, digits), every row kept with weight 1. Each setting
then runs ``--steps`` optimizer steps of the LoRA fine-tune exactly as ``COVRLoop.fine_tune``
does (``VLMLoRAModule.training_step``, backward, clip, AdamW), after 2 warm-up steps. Settings:
``bucketed`` (``sft.bucket_by_length: true``, the default) and ``plain`` (one permutation), and
with ``--checkpointing`` also both with gradient checkpointing. Printed per setting: real tokens
per second, padding share of the token slots, ms per step, and peak memory.
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from covr_lightning.build import build_covr_parts, build_env, build_policy
from covr_lightning.config import load_recipe


def fill_d_f(parts, env, rows: int, image_size: int, seed: int = 0) -> None:
    """``rows`` D_f rows of rendered frames and random actions, all kept with weight 1."""
    rng = np.random.default_rng(seed)
    env.reset(seed=seed)
    frames = []
    for _ in range(min(rows, 32)):  # 32 distinct frames, reused
        env.step(rng.uniform(-1, 1, env.action_space.shape).astype(np.float32))
        frames.append(env.render(image_size, image_size))
    for i in range(rows):
        parts.sft.record_step(
            float(rng.uniform()),
            frame=frames[i % len(frames)],
            action=rng.uniform(-1, 1, env.action_space.shape).astype(np.float32),
            replay_index=i,
            entropy=0.0,
        )
    parts.sft.end_segment(bootstrap=0.0)
    parts.sft.build(entropy=0.0, encode_target=parts.codec.encode, collate=parts.collate)


def fine_tune(parts, steps: int) -> dict[str, float]:
    """``steps`` SFT steps (after 2 warm-up steps): tokens/s, padding share, ms per step."""
    vlm = parts.vlm
    device = next(p for p in vlm.model.parameters() if p.requires_grad).device
    optimizer = vlm.configure_optimizers()
    trainable = [p for group in optimizer.param_groups for p in group["params"]]
    vlm.train()
    tokens = slots = done = 0
    start = None
    while done < steps + 2:
        for batch in parts.sft.train_dataloader():
            if done == 2:
                start, tokens, slots = time.perf_counter(), 0, 0
            mask = batch["attention_mask"]
            tokens, slots = tokens + int(mask.sum()), slots + mask.numel()
            batch = {k: v.to(device) for k, v in batch.items()}
            loss = vlm.training_step(batch, done)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            done += 1
            if done == steps + 2:
                break
    seconds = time.perf_counter() - start
    vlm.eval()
    return {
        "tokens_per_s": tokens / seconds,
        "padding": 1 - tokens / slots,
        "ms_per_step": 1000 * seconds / steps,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipe", default="dmc_cheetah")
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--backbone", default="tiny-qwen2.5-vl", help="vlm.init_args.backbone")
    parser.add_argument("--checkpointing", action="store_true", help="also with grad checkpointing")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = parser.parse_args()
    keep_all = ["sft.init_args.eddf_mode=top_k", "sft.init_args.eddf_quantile=0.0"]
    keep_all += ["sft.init_args.ralw_mode=none", "tracking.enabled=false"]
    keep_all += [f"vlm.init_args.backbone={args.backbone}"]
    settings = [("bucketed", []), ("plain", [])]
    if args.checkpointing:
        on = ["vlm.init_args.gradient_checkpointing=true"]
        settings += [("bucketed + checkpointing", on), ("plain + checkpointing", on)]
    table = Table(title=f"LoRA fine-tune, {args.recipe}, {args.rows} rows, {args.steps} steps")
    for column in ["setting", "tokens/s", "padding", "ms/step", "peak RSS"]:
        table.add_column(column, justify="left" if column == "setting" else "right")
    for name, extra in settings:
        cfg = load_recipe(args.recipe, [*args.overrides, *keep_all, *extra])
        env = build_env(cfg, seed=0)
        policy = build_policy(cfg, env)
        parts = build_covr_parts(cfg, env, policy, device="cpu")
        parts.sft.bucket_by_length = name.startswith("bucketed")
        fill_d_f(parts, env, args.rows, int(cfg.covr.vlm_image_size))
        result = fine_tune(parts, args.steps)
        env.close()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        table.add_row(
            name,
            f"{result['tokens_per_s']:,.0f}",
            f"{100 * result['padding']:.1f} %",
            f"{result['ms_per_step']:.0f}",
            f"{peak:,.0f} MiB (process)",
        )
        Console(stderr=True).log(f"{name}: {result}")
    Console(width=120).print(table)


if __name__ == "__main__":
    main()
