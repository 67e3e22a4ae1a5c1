"""The VLM guide (the paper's): frames in, action priors a_v out.

:meth:`VLMGuide.propose` renders the task prompt once, runs batched greedy generation (no gradients,
KV cache on, a short ``max_new_tokens`` sized from the codec's longest answer), and decodes each
answer with the action codec. ``decode`` is total, so every row gets an in-bounds action; rows the
codec could not read come back with ``valid = False`` and are counted, and the COVR loop masks them
out of the lambda term.

``propose`` holds no state between calls except counters, so the loop can call it for many envs at
once, and a later version can run it on a worker thread while the policy keeps acting.
"""

from __future__ import annotations

import numpy as np
import torch

from covr_lightning.guides.base import Guide, GuideContext
from covr_lightning.vlm.prompting import ActionPrompt, target_token_ids


class VLMGuide(Guide):
    """Turns frames into VLM action priors (the policy's observations are not used).

    Args:
        vlm: The :class:`~covr_lightning.vlm.module.VLMLoRAModule` (its model and processor).
        prompt: Task prompt.
        codec: Action codec of the environment (``encode`` / ``decode``).
        max_new_tokens: Generation budget; default: tokens of the codec's longest answer + 4.
        batch_size: Frames per ``generate`` call (bounds memory for many envs).
    """

    def __init__(
        self,
        vlm,
        prompt: ActionPrompt,
        codec,
        max_new_tokens: int | None = None,
        batch_size: int = 32,
    ) -> None:
        super().__init__()
        self.vlm = vlm
        self.prompt = prompt
        self.codec = codec
        self.batch_size = batch_size
        self.prompt_text = prompt.render(vlm.processor)
        self.max_new_tokens = max_new_tokens or self._answer_budget()

    @classmethod
    def build(cls, context: GuideContext) -> VLMGuide:
        """The run's VLM, prompt and codec; ``covr.max_new_tokens`` and ``covr.guide_batch_size``."""
        return cls(
            context.vlm,
            context.prompt,
            context.codec,
            max_new_tokens=context.max_new_tokens or None,
            batch_size=context.batch_size,
        )

    def _answer_budget(self) -> int:
        """Tokens of the longest answer the codec writes (both bounds, negative numbers) + slack."""
        extremes = [self.codec.low, self.codec.high, -np.abs(self.codec.high) + 0.01]
        texts = [self.codec.encode(np.clip(a, self.codec.low, self.codec.high)) for a in extremes]
        return max(len(ids) for ids in target_token_ids(self.vlm.processor, texts)) + 4

    @torch.inference_mode()
    def generate_text(self, frames: np.ndarray) -> list[str]:
        """Greedy answers for ``frames`` uint8 ``(B, H, W, 3)``."""
        model, processor = self.vlm.model, self.vlm.processor
        device = next(model.parameters()).device
        was_training = model.training
        if was_training:  # eval() walks every submodule: not on every call when already so
            model.eval()  # no LoRA dropout while guiding
        answers: list[str] = []
        try:
            for start in range(0, len(frames), self.batch_size):
                chunk = list(frames[start : start + self.batch_size])
                inputs = processor(
                    text=[self.prompt_text] * len(chunk),
                    images=chunk,
                    padding=True,
                    return_tensors="pt",
                )
                inputs = {k: v.to(device) for k, v in inputs.items()}
                output = model.generate(
                    **inputs,
                    max_new_tokens=self.max_new_tokens,
                    do_sample=False,
                    use_cache=True,
                    pad_token_id=processor.tokenizer.pad_token_id,
                )
                new_tokens = output[:, inputs["input_ids"].shape[1] :]
                answers += processor.batch_decode(new_tokens, skip_special_tokens=True)
        finally:
            if was_training:
                model.train()
        return answers

    def _propose(self, frames: np.ndarray, obs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        decoded = [self.codec.decode(text) for text in self.generate_text(frames)]
        actions = np.stack([action for action, _ in decoded]).astype(np.float32)
        return actions, np.array([ok for _, ok in decoded], dtype=bool)

    def act(self, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The VLM as a policy: greedy actions for uint8 ``frames`` ``(B, H, W, 3)``.

        Not counted in :attr:`queries` / :attr:`invalid` (those describe guidance).
        """
        return self._propose(np.asarray(frames), np.zeros((len(frames), 0), np.float32))
