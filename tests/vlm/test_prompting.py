"""Prompts and SFT batches: exact target masks, left padding, and the chat template."""

from __future__ import annotations

import numpy as np
import pytest
from tests.helpers import distinct_frames

from covr_lightning.vlm.prompting import encode_sft_batch, end_of_turn


def test_prompt_uses_the_chat_template_with_one_image(tiny_backbone, prompt2):
    _, processor = tiny_backbone
    text = prompt2.render(processor)
    assert text.count("<|image_pad|>") == 1
    assert text.endswith("<|im_start|>assistant\n")
    assert "Task: swing the pole up and balance it" in text
    assert "2 numbers between -1.00 and 1.00" in text


def test_target_mask_covers_exactly_the_answer_and_end_of_turn(tiny_backbone, prompt2, codec2):
    _, processor = tiny_backbone
    targets = ["torques: [0.10, -0.20]", "torques: [1.00, -1.00]", "bad"]
    batch = encode_sft_batch(
        processor, prompt2.render(processor), distinct_frames(3, 56), targets, [1.0, 0.5, 0.0]
    )
    assert batch["weights"].tolist() == [1.0, 0.5, 0.0]
    for row, target in enumerate(targets):
        ids = batch["input_ids"][row][batch["target_mask"][row].bool()]
        assert processor.tokenizer.decode(ids) == target + end_of_turn(processor)
        # Left padding: every answer ends at the last position, padding only at the start.
        assert batch["target_mask"][row, -1] == 1
        mask = batch["attention_mask"][row]
        first = int(mask.argmax())
        assert mask[first:].all() and not mask[:first].any()
    # The target never overlaps the image tokens or the prompt.
    image_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert not ((batch["input_ids"] == image_id) & batch["target_mask"].bool()).any()


def test_sft_batch_rejects_ragged_inputs(tiny_backbone, prompt2):
    _, processor = tiny_backbone
    with pytest.raises(ValueError, match="frames"):
        encode_sft_batch(processor, prompt2.render(processor), distinct_frames(2), ["a"], [1.0])


def test_frames_of_other_sizes_batch_together(tiny_backbone, prompt2):
    _, processor = tiny_backbone
    frames = [np.zeros((56, 56, 3), np.uint8), np.zeros((112, 84, 3), np.uint8)]
    batch = encode_sft_batch(processor, prompt2.render(processor), frames, ["a", "b"], [1, 1])
    assert batch["image_grid_thw"].tolist() == [[1, 4, 4], [1, 8, 6]]
