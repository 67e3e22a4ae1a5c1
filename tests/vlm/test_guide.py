"""Guidance: shapes and bounds, batching does not change answers, invalid answers are counted."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tests.helpers import distinct_frames

from covr_lightning.vlm.codecs import make_codec
from covr_lightning.vlm.guide import VLMGuide
from covr_lightning.vlm.module import VLMLoRAModule
from covr_lightning.vlm.prompting import ActionPrompt, encode_sft_batch
from covr_lightning.vlm.tiny import ensure_tiny_backbone

CODEC = make_codec("numeric", -np.ones(2), np.ones(2))
PROMPT = ActionPrompt("swing the pole up and balance it", CODEC.describe())
FRAMES = distinct_frames(8)
ACTIONS = np.random.default_rng(0).uniform(-1, 1, (8, 2))


@pytest.fixture(scope="module")
def untrained_vlm():
    torch.manual_seed(0)
    return VLMLoRAModule("tiny-qwen2.5-vl", lora_rank=4, lora_alpha=8)


@pytest.fixture(scope="module")
def overfit():
    """A tiny VLM fine-tuned on 8 (frame, action text) pairs; the guide's answers before and after."""
    ensure_tiny_backbone()  # built (and its RNG use done) before seeding: independent of test order
    torch.manual_seed(0)
    vlm = VLMLoRAModule("tiny-qwen2.5-vl", lora_rank=32, lora_alpha=64, lora_dropout=0.0, lr=5e-3)
    guide = VLMGuide(vlm, PROMPT, CODEC)
    before = guide.propose(FRAMES)
    targets = [CODEC.encode(a) for a in ACTIONS]
    batch = encode_sft_batch(vlm.processor, guide.prompt_text, FRAMES, targets, np.ones(8))
    optimizer = vlm.configure_optimizers()
    vlm.train()
    for _ in range(200):
        optimizer.zero_grad()
        vlm.training_step(batch).backward()
        optimizer.step()
    return vlm, guide, before


def test_overfitting_eight_pairs_makes_the_guide_answer_them(overfit):
    vlm, guide, (before, valid_before) = overfit
    assert vlm.last_metrics["vlm/token_accuracy"] > 0.95
    proposed, valid = guide.propose(FRAMES)
    assert valid.all()
    assert np.abs(proposed - ACTIONS).mean() < 0.1 < np.abs(before - ACTIONS).mean()
    assert guide.pop_invalid_rate() == pytest.approx((~valid_before).sum() / 16)
    assert guide.pop_invalid_rate() is None


def test_chunked_generation_equals_one_batch(overfit):
    vlm, guide, _ = overfit
    whole = VLMGuide(vlm, PROMPT, CODEC, batch_size=32).generate_text(FRAMES)
    chunked = VLMGuide(vlm, PROMPT, CODEC, batch_size=3).generate_text(FRAMES)
    alone = [VLMGuide(vlm, PROMPT, CODEC).generate_text(f[None])[0] for f in FRAMES]
    assert len(set(whole)) > 1  # the answers differ by frame, so the comparison means something
    assert whole == chunked == alone  # left padding must not change what a row generates


def test_propose_returns_in_bound_actions_and_a_mask(untrained_vlm):
    codec = make_codec("numeric", [-1, -2, 0], [1, 2, 0.5])
    guide = VLMGuide(untrained_vlm, ActionPrompt("run", codec.describe()), codec)
    actions, valid = guide.propose(distinct_frames(5))
    assert actions.shape == (5, 3) and actions.dtype == np.float32
    assert valid.shape == (5,) and valid.dtype == bool
    assert np.all(actions >= codec.low) and np.all(actions <= codec.high)
    # Invalid rows hold the middle of the bounds (the codec's fallback).
    assert np.allclose(actions[~valid], (codec.low + codec.high) / 2)
    assert guide.pop_invalid_rate() == pytest.approx((~valid).mean())


def test_one_frame_is_a_batch_of_one(untrained_vlm, codec2, prompt2):
    guide = VLMGuide(untrained_vlm, prompt2, codec2)
    actions, valid = guide.propose(distinct_frames(1)[0])
    assert actions.shape == (1, 2) and valid.shape == (1,)


def test_answer_budget_fits_the_longest_answer(untrained_vlm):
    codec = make_codec("numeric", -np.ones(6), np.ones(6))
    guide = VLMGuide(untrained_vlm, ActionPrompt("run", codec.describe()), codec)
    longest = codec.encode(-np.ones(6) + 0.01)
    tokens = len(untrained_vlm.processor.tokenizer(longest)["input_ids"])
    assert guide.max_new_tokens >= tokens + 1


@pytest.mark.parametrize(
    "frames",
    [np.zeros((2, 84, 84, 3), np.float32), np.zeros((2, 3, 84, 84), np.uint8), np.zeros(5)],
)
def test_bad_frames_are_rejected(untrained_vlm, codec2, prompt2, frames):
    with pytest.raises(ValueError, match="uint8"):
        VLMGuide(untrained_vlm, prompt2, codec2).propose(frames)


@pytest.mark.parametrize("training", [True, False])
def test_guiding_generates_in_eval_mode_and_leaves_the_mode_alone(
    untrained_vlm, codec2, prompt2, monkeypatch, training
):
    model = untrained_vlm.model
    untrained_vlm.train(training)
    modes = []
    generate = model.generate

    def spy(*args, **kwargs):
        modes.append(model.training)  # no LoRA dropout while guiding
        return generate(*args, **kwargs)

    monkeypatch.setattr(model, "generate", spy)
    VLMGuide(untrained_vlm, prompt2, codec2).propose(distinct_frames(1))
    assert modes == [False]
    assert model.training is training
