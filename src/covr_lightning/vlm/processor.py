"""Image + text processing for the Qwen-VL family without a video processor (so without torchvision).

transformers 5.x's ``Qwen2VLProcessor`` / ``Qwen2_5_VLProcessor`` always build a video processor,
and that needs torchvision, which PyPI only ships linked against CUDA torch. COVR only sends images,
so :class:`ImageTextProcessor` does what the stock processor does for images: the (PIL) image
processor turns frames into patches and a ``(t, h, w)`` grid per image, and every image placeholder
``<|image_pad|>`` in the text is expanded to ``t * h * w / merge_size**2`` copies before
tokenising, which is how many vision tokens the model's patch merger produces for that image.
It exposes the subset of the stock processor's interface COVR uses (``__call__``,
``apply_chat_template``, ``batch_decode``, ``tokenizer``, ``save_pretrained``), so the rest of the
package does not care which one it got.

Like the stock processor it returns ``mm_token_type_ids`` (1 on image tokens, 0 on text): Qwen2-VL
and Qwen2.5-VL in transformers 5.x compute the 3-D (temporal, height, width) rotary positions of
image tokens only when it is given, and fall back to plain 1-D positions otherwise, which a
pretrained model never saw (docs/method.md, "Image positions").
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


class ImageTextProcessor:
    """Qwen-VL style processor for images and text only.

    Args:
        image_processor: A Qwen2-VL image processor (``merge_size``, returns ``image_grid_thw``).
        tokenizer: The model's tokenizer (with its chat template).
        image_token: Placeholder expanded per image.
    """

    def __init__(self, image_processor, tokenizer, image_token: str = "<|image_pad|>") -> None:
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.image_token = image_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        if self.image_token_id is None or self.image_token_id == tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer has no {image_token} token")

    def __call__(
        self,
        text: str | list[str],
        images: list[np.ndarray] | None = None,
        padding: bool = True,
        return_tensors: str = "pt",
        **tokenizer_kwargs: Any,
    ):
        """Tokenise ``text`` with one ``image_token`` per image, in order, expanded to its grid.

        Returns:
            A ``BatchFeature`` with ``input_ids``, ``attention_mask``, ``mm_token_type_ids`` and,
            with images, ``pixel_values`` and ``image_grid_thw``.
        """
        texts = [text] if isinstance(text, str) else list(text)
        image_inputs: dict[str, Any] = {}
        if images is not None and len(images) > 0:
            image_inputs = dict(
                self.image_processor(images=list(images), return_tensors=return_tensors)
            )
            texts = self._expand_placeholders(texts, image_inputs["image_grid_thw"])
        elif any(self.image_token in t for t in texts):
            raise ValueError(f"the text holds {self.image_token} but no images were given")
        encoded = self.tokenizer(
            texts, padding=padding, return_tensors=return_tensors, **tokenizer_kwargs
        )
        encoded["mm_token_type_ids"] = self.mm_token_type_ids(encoded["input_ids"])
        encoded.update(image_inputs)
        return encoded

    def mm_token_type_ids(self, input_ids):
        """Per-token modality ids as the stock processor makes them: 1 on image tokens, else 0."""
        if isinstance(input_ids, list):
            return [[int(t == self.image_token_id) for t in row] for row in input_ids]
        if isinstance(input_ids, np.ndarray):
            return (input_ids == self.image_token_id).astype(input_ids.dtype)
        return (input_ids == self.image_token_id).to(input_ids.dtype)

    def _expand_placeholders(self, texts: list[str], grids) -> list[str]:
        merge = self.image_processor.merge_size**2
        counts = [int(np.prod(np.asarray(grid))) // merge for grid in grids]
        placeholder = "\0"  # not in any prompt; keeps expanded tokens from being counted again
        expanded, index = [], 0
        for text in texts:
            while self.image_token in text:
                if index >= len(counts):
                    raise ValueError("more image placeholders in the text than images")
                text = text.replace(self.image_token, placeholder * counts[index], 1)
                index += 1
            expanded.append(text.replace(placeholder, self.image_token))
        if index != len(counts):
            raise ValueError(f"{len(counts)} images for {index} image placeholders in the text")
        return expanded

    def apply_chat_template(self, messages, **kwargs):
        """The tokenizer's chat template (Qwen writes images as ``<|vision_start|><|image_pad|>...``)."""
        return self.tokenizer.apply_chat_template(messages, **kwargs)

    def batch_decode(self, sequences, **kwargs) -> list[str]:
        """Decode token ids to text."""
        return self.tokenizer.batch_decode(sequences, **kwargs)

    def save_pretrained(self, folder: str | Path) -> None:
        """Write the image processor and tokenizer (loadable by :func:`load_processor`)."""
        self.image_processor.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)


def torchvision_available() -> bool:
    """Whether torchvision imports here (PyPI's build fails beside a CPU-only torch)."""
    try:
        import torchvision  # noqa: F401
    except Exception:  # ImportError, or a RuntimeError from mismatched CUDA libraries
        return False
    return True


def load_processor(folder: str | Path, model_type: str):
    """The model's processor: the stock one where it loads, else :class:`ImageTextProcessor`.

    Args:
        folder: Local folder with the tokenizer and image processor files.
        model_type: ``config.model_type`` (``qwen2_5_vl``, ``qwen2_vl``, ``llava`` ...).

    Returns:
        A processor whose ``tokenizer.padding_side`` is ``left`` (batched generation needs it).
    """
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

    qwen_family = model_type in {"qwen2_vl", "qwen2_5_vl"}
    if qwen_family and not torchvision_available():
        processor = ImageTextProcessor(
            AutoImageProcessor.from_pretrained(folder, backend="pil"),
            AutoTokenizer.from_pretrained(folder),
        )
    else:
        processor = AutoProcessor.from_pretrained(folder)
    processor.tokenizer.padding_side = "left"
    return processor
