"""Backbone loading: the tiny model round-trips, hub names resolve, missing weights fail clearly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from covr_lightning.errors import ConfigError
from covr_lightning.vlm.backbones import (
    SHORT_NAMES,
    BackboneNotFoundError,
    load_backbone,
    resolve_backbone,
)
from covr_lightning.vlm.processor import ImageTextProcessor, torchvision_available
from covr_lightning.vlm.prompting import ActionPrompt
from covr_lightning.vlm.tiny import TINY_NAME, tiny_path


def test_tiny_is_qwen2_5_vl_and_labelled(tiny_backbone):
    model, processor = tiny_backbone
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert model.covr_is_tiny is True
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    assert (tiny_path() / "COVR_TINY_MODEL.txt").is_file()
    assert processor.tokenizer.padding_side == "left"
    if not torchvision_available():
        assert isinstance(processor, ImageTextProcessor)


def test_tiny_is_announced_as_untrained(caplog):
    with caplog.at_level("WARNING"):
        load_backbone(TINY_NAME)
    assert "tiny, randomly initialised" in caplog.text


def test_save_load_round_trip_gives_identical_logits(tiny_backbone, tmp_path):
    model, processor = tiny_backbone
    prompt = ActionPrompt("run", "torques: [a]").render(processor)
    frames = [np.full((56, 56, 3), 90, np.uint8)]
    inputs = processor(text=[prompt], images=frames)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    (tmp_path / "COVR_TINY_MODEL.txt").write_text("copy")
    again, again_processor = load_backbone(str(tmp_path))
    again_inputs = again_processor(text=[prompt], images=frames)
    assert torch.equal(inputs["input_ids"], again_inputs["input_ids"])
    with torch.no_grad():
        expected = model(**inputs).logits
        actual = again(**again_inputs).logits
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def test_image_placeholder_expands_to_merged_patch_count(tiny_backbone):
    _, processor = tiny_backbone
    prompt = ActionPrompt("run", "x").render(processor)
    inputs = processor(text=[prompt, prompt], images=[np.zeros((84, 84, 3), np.uint8)] * 2)
    # 84 px -> a 6 x 6 grid of 14 px patches -> 9 tokens after the 2 x 2 merge, per image.
    assert inputs["image_grid_thw"].tolist() == [[1, 6, 6], [1, 6, 6]]
    image_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert (inputs["input_ids"] == image_id).sum(dim=1).tolist() == [9, 9]


def test_processor_rejects_placeholder_image_mismatch(tiny_backbone):
    _, processor = tiny_backbone
    prompt = ActionPrompt("run", "x").render(processor)
    with pytest.raises(ValueError, match="images"):
        processor(text=[prompt, prompt], images=[np.zeros((56, 56, 3), np.uint8)])
    with pytest.raises(ValueError, match="no images"):
        processor(text=[prompt])


@pytest.mark.parametrize("name", sorted(SHORT_NAMES))
def test_missing_hub_weights_give_one_clear_line(name, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(BackboneNotFoundError) as caught:
        resolve_backbone(name)
    line = caught.value.line()
    assert "\n" not in line
    assert SHORT_NAMES[name] in line and "not in the Hugging Face cache" in line
    assert f"hf download {SHORT_NAMES[name]}" in line and TINY_NAME in line


def test_download_is_refused_when_offline(monkeypatch, tmp_path):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(BackboneNotFoundError, match="HF_HUB_OFFLINE is set"):
        resolve_backbone("Qwen/Qwen2.5-VL-3B-Instruct", download=True)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("not-a-model", "unknown VLM backbone"),
        ("./no/such/folder", "does not exist"),
    ],
)
def test_bad_names_are_config_errors(name, message):
    with pytest.raises(ConfigError, match=message):
        resolve_backbone(name)


def test_folder_without_config_is_rejected(tmp_path):
    with pytest.raises(BackboneNotFoundError, match="no config.json"):
        resolve_backbone(str(tmp_path))


def test_unknown_dtype_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown VLM dtype"):
        load_backbone(TINY_NAME, dtype="fp8")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_4bit_without_cuda_says_so():
    with pytest.raises(ConfigError, match="needs a CUDA GPU"):
        load_backbone(TINY_NAME, quantization="4bit")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_4bit_loads_on_cuda():
    pytest.importorskip("bitsandbytes")
    model, _ = load_backbone(TINY_NAME, device="cuda", quantization="4bit")
    assert any("4bit" in type(m).__name__ for m in model.modules())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_auto_dtype_is_bf16_on_cuda():
    model, _ = load_backbone(TINY_NAME, device="cuda")
    assert next(model.parameters()).dtype == torch.bfloat16
