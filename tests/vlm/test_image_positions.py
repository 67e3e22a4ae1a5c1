"""Qwen-VL sees its images with 3-D rotary positions in fine-tuning and in guidance.

Qwen2/2.5-VL in transformers 5.x computes the (temporal, height, width) positions of image tokens
only when ``mm_token_type_ids`` is passed; without it every token gets a plain 1-D position.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
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


# --------------------------------------------------------------- against the stock processor
def _core(model):
    """The module that owns ``get_rope_index`` (under a PEFT wrapper or not)."""
    return model.model if hasattr(model.model, "get_rope_index") else model.base_model.model.model


@pytest.fixture(scope="module")
def stock_processor(tiny_backbone):
    """transformers' own ``Qwen2_5_VLProcessor`` over the tiny model's image processor and tokenizer.

    It wants a video processor, which needs torchvision; images never touch it, so the class check
    that demands one is bypassed.
    """
    from transformers import Qwen2_5_VLProcessor

    class ImagesOnly(Qwen2_5_VLProcessor):
        def check_argument_for_proper_class(self, attribute_name, argument):
            return argument

    _, processor = tiny_backbone
    return ImagesOnly(
        image_processor=processor.image_processor,
        tokenizer=processor.tokenizer,
        video_processor=None,
        chat_template=processor.tokenizer.chat_template,
    )


def test_image_only_processor_output_equals_the_stock_processor(
    tiny_backbone, stock_processor, prompt2
):
    _, processor = tiny_backbone
    text = prompt2.render(processor)
    texts, frames = [text, "short<|vision_start|><|image_pad|><|vision_end|>"], distinct_frames(2)
    ours = processor(text=texts, images=list(frames), padding=True, return_tensors="pt")
    stock = stock_processor(text=texts, images=list(frames), padding=True, return_tensors="pt")
    assert set(ours) == set(stock)
    for key in stock:
        assert torch.equal(ours[key], stock[key]), key


def test_sft_batch_through_the_stock_processor_spans_prompt_and_answer(
    tiny_backbone, stock_processor, prompt2, codec2
):
    _, processor = tiny_backbone
    targets = [codec2.encode(np.array([0.5, -1.0])), codec2.encode(np.array([1.0, -0.25]))]
    args = (prompt2.render(processor), distinct_frames(2), targets, np.array([1.0, 0.5]))
    stock = encode_sft_batch(stock_processor, *args)
    ours = encode_sft_batch(processor, *args)
    length = stock["input_ids"].shape
    assert stock["mm_token_type_ids"].shape == length
    assert stock["attention_mask"].shape == stock["target_mask"].shape == length
    assert set(ours) == set(stock)
    for key in stock:
        assert torch.equal(ours[key], stock[key]), key


def test_rope_positions_and_logits_equal_the_stock_ones(
    tiny_backbone, stock_processor, prompt2, codec2
):
    model, processor = tiny_backbone
    core = _core(model)
    text, frames = prompt2.render(processor), distinct_frames(2)
    # Guidance inputs: positions from our processor's output equal those from the stock one's.
    ours = processor(text=[text] * 2, images=list(frames), return_tensors="pt")
    stock = stock_processor(text=[text] * 2, images=list(frames), return_tensors="pt")
    ours_pos, ours_delta = core.get_rope_index(**ours)
    stock_pos, stock_delta = core.get_rope_index(**stock)
    assert torch.equal(ours_pos, stock_pos) and torch.equal(ours_delta, stock_delta)
    assert (ours_delta < 0).all()  # 3-D positions of a grid of images take fewer steps than tokens
    # SFT batch: our ids, and ids made the stock way from the full prompt + answer tokens.
    targets = [codec2.encode(np.array([0.5, -1.0])), codec2.encode(np.array([0.0, 0.25]))]
    batch = encode_sft_batch(processor, text, frames, targets, np.ones(2))
    inputs = {k: v for k, v in batch.items() if k not in ("target_mask", "weights")}
    reference = dict(inputs)
    reference["mm_token_type_ids"] = torch.tensor(
        stock_processor.create_mm_token_type_ids(inputs["input_ids"])
    )
    assert torch.equal(core.get_rope_index(**inputs)[0], core.get_rope_index(**reference)[0])
    with torch.no_grad():
        core.rope_deltas = None
        logits = model(**inputs, use_cache=False).logits
        core.rope_deltas = None
        expected = model(**reference, use_cache=False).logits
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)


# ----------------------------------------------------------- fine-tuning and guidance pass it on
def _record_rope_calls(monkeypatch, core) -> list[dict]:
    calls: list[dict] = []
    original = core.get_rope_index

    def recording(input_ids, mm_token_type_ids=None, **kwargs):
        calls.append({"input_ids": input_ids, "mm_token_type_ids": mm_token_type_ids})
        return original(input_ids, mm_token_type_ids=mm_token_type_ids, **kwargs)

    monkeypatch.setattr(core, "get_rope_index", recording)
    return calls


def test_training_step_computes_three_d_positions(monkeypatch, prompt2, codec2):
    from covr_lightning.vlm.module import VLMLoRAModule

    vlm = VLMLoRAModule("tiny-qwen2.5-vl", lora_rank=4, lora_alpha=8)
    targets = [codec2.encode(np.array([0.5, -1.0]))] * 2
    batch = encode_sft_batch(
        vlm.processor, prompt2.render(vlm.processor), distinct_frames(2), targets, np.ones(2)
    )
    calls = _record_rope_calls(monkeypatch, _core(vlm.model))
    vlm.training_step(batch).backward()
    assert len(calls) == 1
    assert torch.equal(calls[0]["mm_token_type_ids"], batch["mm_token_type_ids"])


def test_guidance_generates_with_three_d_positions(monkeypatch, tiny_backbone, prompt2, codec2):
    from covr_lightning.vlm.guide import VLMGuide

    model, processor = tiny_backbone
    core = _core(model)
    guide = VLMGuide(SimpleNamespace(model=model, processor=processor), prompt2, codec2)
    calls = _record_rope_calls(monkeypatch, core)
    guide.generate_text(distinct_frames(2))
    assert calls, "generate never computed 3-D positions"
    image = calls[0]["input_ids"] == _image_id(processor)
    assert torch.equal(calls[0]["mm_token_type_ids"].bool(), image)
    assert (core.rope_deltas < 0).all()  # 1-D positions would leave the deltas at 0


def test_guidance_through_the_stock_processor_equals_ours(
    tiny_backbone, stock_processor, prompt2, codec2
):
    from covr_lightning.vlm.guide import VLMGuide

    model, processor = tiny_backbone
    frames = distinct_frames(3)
    answers = {}
    for name, proc in (("ours", processor), ("stock", stock_processor)):
        guide = VLMGuide(SimpleNamespace(model=model, processor=proc), prompt2, codec2)
        answers[name] = guide.generate_text(frames)
    assert answers["ours"] == answers["stock"]


# ------------------------------------------------------------------------ other backbones
def test_qwen2_vl_gets_three_d_positions_from_the_image_only_processor(prompt2, codec2):
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    from covr_lightning.vlm.processor import ImageTextProcessor, load_processor
    from covr_lightning.vlm.tiny import ensure_tiny_backbone

    processor = load_processor(ensure_tiny_backbone(), "qwen2_vl")
    assert isinstance(processor, ImageTextProcessor)
    token_id = processor.tokenizer.convert_tokens_to_ids
    config = Qwen2VLConfig(
        text_config={
            "vocab_size": len(processor.tokenizer),
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 1,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3]},
        },
        vision_config={"depth": 1, "embed_dim": 32, "hidden_size": 64, "num_heads": 2},
        image_token_id=token_id("<|image_pad|>"),
        video_token_id=token_id("<|video_pad|>"),
        vision_start_token_id=token_id("<|vision_start|>"),
        vision_end_token_id=token_id("<|vision_end|>"),
    )
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(config).eval()
    targets = [codec2.encode(np.array([0.5, -1.0]))] * 2
    batch = encode_sft_batch(
        processor, prompt2.render(processor), distinct_frames(2), targets, np.ones(2)
    )
    inputs = {k: v for k, v in batch.items() if k not in ("target_mask", "weights")}
    assert inputs["mm_token_type_ids"].shape == inputs["input_ids"].shape
    positions, _ = model.model.get_rope_index(**inputs)
    image = inputs["mm_token_type_ids"][0].bool()
    assert not torch.equal(positions[1, 0][image], positions[2, 0][image])
    with torch.no_grad():
        assert torch.isfinite(model(**inputs).logits).all()
        model.model.rope_deltas = None
        inputs.pop("mm_token_type_ids")
        with pytest.raises(ValueError, match="mm_token_type_ids"):  # Qwen2-VL refuses without
            model(**inputs)


def test_llava_sft_batch_and_forward_are_unchanged(codec2):
    """LLaVA's processor has no per-token extras: the batch is ids, masks and pixels, and runs."""
    from transformers import (
        AutoTokenizer,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from covr_lightning.vlm.tiny import ensure_tiny_backbone

    tokenizer = AutoTokenizer.from_pretrained(ensure_tiny_backbone())
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tokenizer.padding_side = "left"
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="full",
        num_additional_image_tokens=1,  # CLIP's CLS token
    )
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=28,
            patch_size=14,
        ).to_dict(),
        text_config=LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
        ).to_dict(),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
    )
    model = LlavaForConditionalGeneration(config).eval()
    targets = [codec2.encode(np.array([0.5, -1.0])), codec2.encode(np.array([0.0, 0.25]))]
    batch = encode_sft_batch(
        processor, "USER: <image>\nTask ASSISTANT:", distinct_frames(2), targets, np.ones(2)
    )
    assert set(batch) == {
        "input_ids", "attention_mask", "pixel_values", "target_mask", "weights"
    }  # fmt: skip
    assert batch["attention_mask"].shape == batch["target_mask"].shape == batch["input_ids"].shape
    inputs = {k: v for k, v in batch.items() if k not in ("target_mask", "weights")}
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape[:2] == batch["input_ids"].shape
