"""The tiny offline backbone: Qwen2.5-VL's architecture at toy size, built locally.

No pretrained VLM can be downloaded in tests or on a machine without the hub, so the quickstart and
the test suite use ``tiny-qwen2.5-vl``: a real ``Qwen2_5_VLForConditionalGeneration`` (vision tower,
window attention, patch merger, M-RoPE language model) with a few small layers and random weights,
a byte-level BPE tokenizer trained in a second on the prompt and action vocabulary, Qwen's special
tokens and a chat template, and the PIL image processor. It is written once with
``save_pretrained`` to a cache folder and then loaded through :func:`~covr_lightning.vlm.backbones.load_backbone`
exactly like a downloaded model. It is **untrained**: its guidance is noise until COVR fine-tunes it.

The cache folder is ``$COVR_LIGHTNING_CACHE`` (default ``~/.cache/covr-lightning``); the folder
name carries :data:`TINY_VERSION`, so a change to this file builds a fresh copy.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from covr_lightning.vlm.quiet import quiet_progress

TINY_NAME = "tiny-qwen2.5-vl"
TINY_VERSION = 1
"""Bump when the tiny model's config, tokenizer or template changes."""

# Qwen2.5-VL's special tokens, in Qwen's order; the vision ones are wired into the model config.
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# Qwen2-VL's chat template, reduced to what COVR sends: system/user/assistant turns whose content
# is a string or a list of {"type": "image"} / {"type": "text", "text": ...} items.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Text the tokenizer's merges are learnt from: the prompts and answers COVR produces.
_CORPUS = (
    "You are a helpful assistant. You control an agent from the image. ",
    "Task: run forward as fast as possible. Swing the pole up and balance it. ",
    "Answer with the action only, in this format: torques: [0.00, 0.00]. ",
    "torques: [0.12, -0.80, 0.33, 0.00, 0.71, -0.05, 1.00, -1.00, 0.50, -0.25]",
    "accelerate moderately and steer slightly left, brake hard and steer sharply right, ",
    "coast and keep straight, steer slightly left, half gas, no brake, full gas, light brake",
    "0123456789 .,:;-+[]()",
)


def cache_root() -> Path:
    """Folder where locally built backbones are kept."""
    return Path(os.environ.get("COVR_LIGHTNING_CACHE", Path.home() / ".cache" / "covr-lightning"))


def tiny_path() -> Path:
    """Folder of the tiny backbone (built on first use)."""
    return cache_root() / f"{TINY_NAME}-v{TINY_VERSION}"


def ensure_tiny_backbone() -> Path:
    """Build and save the tiny backbone unless it is already in the cache; return its folder.

    The folder is written under a temporary name and renamed into place, so parallel test workers
    or an interrupted build never leave a half-written model behind.
    """
    target = tiny_path()
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        _write_tiny(staging)
        # If another process finished first, its copy is identical: keep it.
        with contextlib.suppress(OSError):
            staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _train_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(_CORPUS) * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        chat_template=CHAT_TEMPLATE,
        model_max_length=4096,
    )


def _write_tiny(folder: Path) -> None:
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    tokenizer = _train_tokenizer()
    token_id = tokenizer.convert_tokens_to_ids
    hidden = 64
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": hidden,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 4096,
            # M-RoPE splits head_dim / 2 = 8 rotary frequencies over (time, height, width).
            "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3]},
            "bos_token_id": token_id("<|endoftext|>"),
            "eos_token_id": token_id("<|im_end|>"),
            "pad_token_id": token_id("<|endoftext|>"),
        },
        vision_config={
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "out_hidden_size": hidden,
            "fullatt_block_indexes": [1],
        },
        image_token_id=token_id("<|image_pad|>"),
        video_token_id=token_id("<|video_pad|>"),
        vision_start_token_id=token_id("<|vision_start|>"),
        vision_end_token_id=token_id("<|vision_end|>"),
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)  # the same tiny model on every machine
    model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config.eos_token_id = token_id("<|im_end|>")
    model.generation_config.pad_token_id = token_id("<|endoftext|>")
    with quiet_progress(True):
        model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    # At most 112 x 112 pixels -> 8 x 8 patches of 14 -> 16 image tokens after the 2 x 2 merge.
    Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=112 * 112).save_pretrained(folder)
    (folder / "COVR_TINY_MODEL.txt").write_text(
        "Tiny, randomly initialised Qwen2.5-VL built by covr_lightning.vlm.tiny for tests and the "
        "quickstart. It is not a pretrained model.\n"
    )
