"""Qwen-VL sees its images with 3-D rotary positions in fine-tuning and in guidance.

Qwen2/2.5-VL in transformers 5.x computes the (temporal, height, width) positions of image tokens
only when ``mm_token_type_ids`` is passed; without it every token gets a plain 1-D position.
"""

from __future__ import annotations

import numpy as np
import torch
from tests.helpers import distinct_frames

from covr_lightning.vlm.prompting import encode_sft_batch


def _image_id(processor) -> int:
    return processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")


def test_processor_marks_exactly_the_image_tokens(tiny_backbone, prompt2):
    _, processor = tiny_backbone
    text = prompt2.render(processor)
    out = processor(text=[text, text], images=list(distinct_frames(2)), return_tensors="pt")
    assert "mm_token_type_ids" in out
    types = out["mm_token_type_ids"]
    assert types.shape == out["input_ids"].shape
    assert torch.equal(types.bool(), out["input_ids"] == _image_id(processor))
    assert int(types.sum()) > 0


def test_sft_batch_per_token_tensors_span_prompt_and_answer(tiny_backbone, prompt2, codec2):
    _, processor = tiny_backbone
    targets = [codec2.encode(np.array([0.5, -1.0])), codec2.encode(np.array([0.0, 0.25]))]
    batch = encode_sft_batch(
        processor, prompt2.render(processor), distinct_frames(2), targets, np.ones(2)
    )
    types = batch["mm_token_type_ids"]
    assert types.shape == batch["input_ids"].shape  # not the prompt's length
    assert torch.equal(types.bool(), batch["input_ids"] == _image_id(processor))
    assert not types[batch["target_mask"].bool()].any()  # answer tokens are text


def test_the_model_gets_three_d_positions_and_they_change_the_logits(
    tiny_backbone, prompt2, codec2
):
    model, processor = tiny_backbone
    targets = [codec2.encode(np.array([0.5, -1.0]))] * 2
    batch = encode_sft_batch(
        processor, prompt2.render(processor), distinct_frames(2), targets, np.ones(2)
    )
    inputs = {k: v for k, v in batch.items() if k not in ("target_mask", "weights")}
    core = model.model if hasattr(model.model, "get_rope_index") else model.base_model.model.model
    positions, _ = core.get_rope_index(
        inputs["input_ids"],
        mm_token_type_ids=inputs["mm_token_type_ids"],
        image_grid_thw=inputs["image_grid_thw"],
        attention_mask=inputs["attention_mask"],
    )
    image = inputs["mm_token_type_ids"][0].bool()
    # Height and width positions of the image tokens vary independently of the temporal one.
    assert not torch.equal(positions[1, 0][image], positions[2, 0][image])
    with torch.no_grad():
        with_types = model(**inputs, use_cache=False).logits
        core.rope_deltas = None
        without = {k: v for k, v in inputs.items() if k != "mm_token_type_ids"}
        plain = model(**without, use_cache=False).logits
    assert not torch.allclose(with_types, plain)
