"""Prompts and SFT batches: what the VLM reads, and what it is taught to answer.

A prompt is one chat turn through the backbone's own chat template: a system line, then a user turn
holding the frame and the text "task description + answer format" (the format comes from the
action codec, so the model is told exactly what :meth:`decode` will read). Guidance generates after
that prompt; fine-tuning appends the target text and the end-of-turn token to it.

SFT batches are built from token ids, not by tokenising ``prompt + target`` as one string, so the
prompt/target boundary can never merge into one BPE token and the target mask is exact. Rows are
left-padded: every row's target then ends at the last position, which lets the module ask the model
for the logits of the last few positions only (``logits_to_keep``) instead of the whole sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

DEFAULT_SYSTEM = "You are a control assistant. You look at the image and choose the next action."


@dataclass(frozen=True)
class ActionPrompt:
    """The task prompt of one environment.

    Args:
        task: What the agent should do, in words ("make the cheetah run forward fast").
        answer_format: How to write the action (``codec.describe()``).
        system: System message.
    """

    task: str
    answer_format: str
    system: str = DEFAULT_SYSTEM

    def messages(self) -> list[dict]:
        """Chat messages with one image placeholder, in the Hugging Face multimodal format."""
        return [
            {"role": "system", "content": self.system},
            {
                "role": "user",
                "content": [
                    {"type": "image"},
                    {"type": "text", "text": f"Task: {self.task}\n{self.answer_format}"},
                ],
            },
        ]

    def render(self, processor) -> str:
        """Prompt text up to the assistant's turn, through the backbone's chat template."""
        return processor.apply_chat_template(
            self.messages(), tokenize=False, add_generation_prompt=True
        )


def end_of_turn(processor) -> str:
    """The text that closes an assistant answer (``<|im_end|>`` for Qwen, EOS otherwise)."""
    tokenizer = processor.tokenizer
    vocab = tokenizer.get_vocab()
    return "<|im_end|>" if "<|im_end|>" in vocab else tokenizer.eos_token


def target_token_ids(processor, targets: list[str]) -> list[list[int]]:
    """Token ids of each answer followed by the end-of-turn token."""
    suffix = end_of_turn(processor)
    encoded = processor.tokenizer([t + suffix for t in targets], add_special_tokens=False)
    return [list(ids) for ids in encoded["input_ids"]]


def encode_sft_batch(
    processor,
    prompt_text: str,
    frames: np.ndarray | list[np.ndarray],
    targets: list[str],
    weights: np.ndarray | list[float],
) -> dict[str, torch.Tensor]:
    """Tokenise (frame, prompt, target, weight) rows into one left-padded training batch.

    Args:
        processor: The backbone's processor.
        prompt_text: :meth:`ActionPrompt.render` output (holds one image placeholder).
        frames: ``B`` RGB frames, uint8 ``(H, W, 3)``.
        targets: ``B`` answer texts (``codec.encode(a_r)``).
        weights: ``B`` RALW weights.

    Returns:
        ``input_ids``, ``attention_mask`` ``(B, T)``, the image tensors the model needs
        (``pixel_values``, ``image_grid_thw`` for Qwen), the processor's per-token tensors at the
        full prompt + answer length (Qwen's ``mm_token_type_ids``), ``target_mask`` ``(B, T)`` (1 on answer
        tokens and the end-of-turn token, 0 on padding, prompt and image tokens) and ``weights``
        ``(B,)``.
    """
    rows = len(targets)
    if len(frames) != rows or len(weights) != rows:
        raise ValueError(f"{len(frames)} frames, {rows} targets, {len(weights)} weights")
    prompts = processor(text=[prompt_text] * rows, images=list(frames), return_tensors="pt")
    answers = target_token_ids(processor, targets)
    pad_id = processor.tokenizer.pad_token_id
    sequences, is_target = [], []
    for row in range(rows):
        keep = prompts["attention_mask"][row].bool()
        prompt_ids = prompts["input_ids"][row][keep].tolist()
        sequences.append(prompt_ids + answers[row])
        is_target.append([0] * len(prompt_ids) + [1] * len(answers[row]))
    length = max(len(s) for s in sequences)
    input_ids = torch.full((rows, length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((rows, length), dtype=torch.long)
    target_mask = torch.zeros((rows, length), dtype=torch.long)
    for row, (ids, mask) in enumerate(zip(sequences, is_target, strict=True)):
        input_ids[row, length - len(ids) :] = torch.tensor(ids)
        attention_mask[row, length - len(ids) :] = 1
        target_mask[row, length - len(ids) :] = torch.tensor(mask)
    prompt_length = prompts["input_ids"].shape[1]
    batch = {}
    for key, value in prompts.items():
        if key in ("input_ids", "attention_mask"):
            continue
        if torch.is_tensor(value) and value.shape[:2] == (rows, prompt_length):
            # A per-token tensor (mm_token_type_ids, ...): the prompt's values, left-padded to
            # the full length, 0 (text) on the answer tokens.
            full = torch.zeros((rows, length, *value.shape[2:]), dtype=value.dtype)
            for row, ids in enumerate(sequences):
                keep = prompts["attention_mask"][row].bool()
                start = length - len(ids)
                full[row, start : start + int(keep.sum())] = value[row][keep]
            value = full
        batch[key] = value
    batch.update(
        input_ids=input_ids,
        attention_mask=attention_mask,
        target_mask=target_mask,
        weights=torch.as_tensor(np.asarray(weights, dtype=np.float32)),
    )
    return batch
