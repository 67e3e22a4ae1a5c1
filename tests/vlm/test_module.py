"""VLMLoRAModule: LoRA placement and share, the RALW loss by hand, adapter round trips, overfitting."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from tests.helpers import distinct_frames

from covr_lightning.errors import ConfigError
from covr_lightning.vlm.module import VLMLoRAModule, token_nll
from covr_lightning.vlm.prompting import encode_sft_batch


@pytest.fixture
def vlm():
    torch.manual_seed(0)
    return VLMLoRAModule("tiny-qwen2.5-vl", lora_rank=8, lora_alpha=16)


def _batch(vlm, prompt, codec, weights, seed=0):
    rng = np.random.default_rng(seed)
    frames = distinct_frames(len(weights))
    actions = rng.uniform(-1, 1, (len(weights), codec.action_dim))
    targets = [codec.encode(a) for a in actions]
    text = prompt.render(vlm.processor)
    return encode_sft_batch(vlm.processor, text, frames, targets, weights), actions, frames


def test_lora_sits_on_language_linear_layers_only(vlm):
    lora_layers = [n for n, _ in vlm.model.named_modules() if n.endswith("lora_A")]
    assert lora_layers, "no LoRA layer was added"
    assert all(".language_model." in n for n in lora_layers)
    assert not any(".visual." in n or "lm_head" in n for n in lora_layers)
    # 2 decoder layers x 7 linear layers (q, k, v, o, gate, up, down).
    assert len(lora_layers) == 14


def test_trainable_share_matches_a_parameter_count(vlm):
    trainable = sum(p.numel() for p in vlm.model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in vlm.model.parameters())
    assert vlm.trainable_parameters == trainable
    assert vlm.total_parameters == total
    assert vlm.trainable_share == pytest.approx(trainable / total)
    # LoRA A (r x in) + B (out x r) on every targeted layer: r * (in + out) each.
    expected = sum(
        8 * (m.in_features + m.out_features)
        for n, m in vlm.model.named_modules()
        if hasattr(m, "lora_A") and isinstance(m, torch.nn.Module) and hasattr(m, "in_features")
    )
    assert trainable == expected


def test_only_adapter_weights_receive_gradients(vlm, prompt2, codec2):
    batch, _, _ = _batch(vlm, prompt2, codec2, [1.0, 0.5, 0.0])
    vlm.train()
    vlm.training_step(batch).backward()
    with_grad = {n for n, p in vlm.model.named_parameters() if p.grad is not None}
    assert with_grad and all("lora_" in n for n in with_grad)
    assert all(not p.requires_grad for n, p in vlm.model.named_parameters() if "lora_" not in n)
    assert any(p.grad.abs().sum() > 0 for n, p in vlm.model.named_parameters() if n in with_grad)


def test_ralw_loss_equals_a_hand_computation(vlm, prompt2, codec2):
    weights = [1.0, 0.25, 0.0]
    batch, _, _ = _batch(vlm, prompt2, codec2, weights)
    vlm.eval()  # no dropout: the module's forward and ours must see the same logits
    loss, _ = vlm.sft_loss(batch)
    with torch.no_grad():
        inputs = {k: v for k, v in batch.items() if k not in ("target_mask", "weights")}
        logits = vlm.model(**inputs).logits  # every position, no logits_to_keep
    log_p = torch.log_softmax(logits.double(), dim=-1)
    vocab = log_p.shape[-1]
    expected = 0.0
    for row, w in enumerate(weights):
        row_sum = 0.0
        for t in range(1, batch["input_ids"].shape[1]):
            if batch["target_mask"][row, t]:  # a target token, predicted from position t - 1
                y = batch["input_ids"][row, t]
                # label smoothing 0.1: (1 - eps) * -log p_y + eps * mean_v -log p_v
                row_sum += -(0.9 + 0.1 / vocab) * log_p[row, t - 1, y] - (0.1 / vocab) * (
                    log_p[row, t - 1].sum() - log_p[row, t - 1, y]
                )
        expected += w * row_sum
    expected /= 2  # N_v: two rows have w > 0
    assert loss.item() == pytest.approx(float(expected), rel=1e-5)


def test_token_nll_without_smoothing_is_cross_entropy():
    logits = torch.tensor([[[2.0, 0.0, -1.0]]])
    nll = token_nll(logits, torch.tensor([[0]]), label_smoothing=0.0)
    expected = -math.log(math.exp(2) / (math.exp(2) + 1 + math.exp(-1)))
    assert nll.item() == pytest.approx(expected, rel=1e-6)


def test_adapter_state_round_trip(vlm, tmp_path, prompt2, codec2):
    batch, _, _ = _batch(vlm, prompt2, codec2, [1.0, 1.0])
    optimizer = vlm.configure_optimizers()
    vlm.train()
    for _ in range(3):
        optimizer.zero_grad()
        vlm.training_step(batch).backward()
        optimizer.step()
    vlm.eval()
    expected = vlm.sft_loss(batch)[0].item()
    vlm.save_adapter(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    state = vlm.adapter_state_dict()

    torch.manual_seed(1)
    fresh = VLMLoRAModule("tiny-qwen2.5-vl", lora_rank=8, lora_alpha=16).eval()
    assert fresh.sft_loss(batch)[0].item() != pytest.approx(expected)
    fresh.load_adapter(tmp_path / "adapter")
    assert fresh.sft_loss(batch)[0].item() == pytest.approx(expected, rel=1e-6)
    fresh.load_adapter_state_dict(state)
    assert fresh.sft_loss(batch)[0].item() == pytest.approx(expected, rel=1e-6)


def test_adapter_of_another_rank_is_refused(vlm):
    other = VLMLoRAModule("tiny-qwen2.5-vl", lora_rank=4, lora_alpha=8)
    with pytest.raises(ValueError, match="do not fit"):
        vlm.load_adapter_state_dict(other.adapter_state_dict())


def test_missing_adapter_folder_is_a_config_error(vlm, tmp_path):
    with pytest.raises(ConfigError, match="no LoRA adapter"):
        vlm.load_adapter(tmp_path)


def test_target_modules_that_match_nothing_name_the_key():
    with pytest.raises(ConfigError, match="target_modules"):
        VLMLoRAModule("tiny-qwen2.5-vl", target_modules=["nope_proj"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("lora_rank=0", "'vlm.lora_rank' is 0, but it must be an integer > 0"),
        ("label_smoothing=1.0", "'vlm.label_smoothing' is 1.0, but it must be a number in [0, 1)"),
        ("lr=0", "'vlm.lr' is 0"),
    ],
)
def test_bad_hyperparameters_are_refused_by_the_typed_signature(override, message):
    from covr_lightning.config import load_recipe

    with pytest.raises(ConfigError) as err:
        load_recipe("quickstart", [f"vlm.{override}"])
    assert message in err.value.line()
