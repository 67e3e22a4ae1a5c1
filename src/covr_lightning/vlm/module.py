"""VLMLoRAModule: a vision-language model with a LoRA adapter, fine-tuned with the RALW loss.

The base model's weights stay frozen; peft adds LoRA to the *language model's* linear layers
(attention q/k/v/o and MLP gate/up/down; the vision tower and the LM head stay untouched, as the
paper fine-tunes the language side). One :meth:`training_step` is one RALW step:

    NLL_bt = label-smoothed cross-entropy of target token t of row b      (prompt, image, pad masked)
    L      = (1 / N_v) * sum_b w_b * sum_t NLL_bt,   N_v = #{b : w_b > 0}

(:func:`covr_lightning.data.ralw.ralw_loss`). Batches come from
:func:`covr_lightning.vlm.prompting.encode_sft_batch`: left-padded, so every target ends at the
last position and the model computes logits only for the last ``max target length + 1`` positions
(``logits_to_keep``): with a 150k vocabulary that is most of the activation memory of a step.

Optimisation is automatic in Lightning's sense: ``training_step`` returns the loss; the COVR loop
(or a ``lightning.Trainer``) runs backward and the optimizer from :meth:`configure_optimizers`.
Checkpoints hold only the adapter (:meth:`adapter_state_dict`); the base weights are reloaded from
the backbone.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from pathlib import Path

import lightning
import torch
import torch.nn.functional as F
from jsonargparse.typing import PositiveFloat, PositiveInt
from torch import Tensor, nn

from covr_lightning.data.ralw import ralw_loss
from covr_lightning.errors import ConfigError
from covr_lightning.types import UnitFraction
from covr_lightning.vlm.backbones import Quantization, load_backbone

log = logging.getLogger(__name__)

LANGUAGE_LINEAR_LAYERS = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)
"""Linear layers of a Qwen/LLaMA-style decoder block: where LoRA goes by default."""

_BATCH_ONLY_KEYS = ("target_mask", "weights")


def language_model_prefix(model: nn.Module) -> str:
    """Dotted name of the language model inside a vision-language model."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    for name, module in model.named_modules():
        if decoder is not None and module is decoder:
            return name
    for name, _ in model.named_modules():
        if name.endswith("language_model"):
            return name
    raise ValueError(f"cannot find the language model inside {type(model).__name__}")


def lora_target_regex(model: nn.Module, layers: Sequence[str]) -> str:
    """peft ``target_modules`` regex: the named linear layers inside the language model only."""
    prefix = language_model_prefix(model).replace(".", r"\.")
    return rf"^{prefix}\..*\.({'|'.join(layers)})$"


def token_nll(logits: Tensor, labels: Tensor, label_smoothing: float) -> Tensor:
    """Per-token label-smoothed cross-entropy ``(B, T)``.

    With smoothing eps over a vocabulary of V tokens the target distribution is
    (1 - eps) one-hot(y) + eps / V, so NLL = (1 - eps) (-log p_y) + eps * mean_v(-log p_v).
    """
    flat = F.cross_entropy(
        logits.float().flatten(0, 1),
        labels.flatten(),
        reduction="none",
        label_smoothing=label_smoothing,
    )
    return flat.view(labels.shape)


class VLMLoRAModule(lightning.LightningModule):
    """A Hugging Face VLM with a LoRA adapter on its language model.

    Args:
        backbone: ``tiny-qwen2.5-vl``, a short name (``qwen2.5-vl-3b``, ``qwen2-vl-2b``,
            ``llava-1.5-7b``), a hub id or a local folder (see ``vlm/backbones.py``).
        lora_rank: LoRA rank r (paper: 128).
        lora_alpha: LoRA alpha (paper: 16 for DMC, 256 for CARLA).
        lora_dropout: Dropout on the LoRA input (0.05).
        target_modules: Linear layer names of the language model that get LoRA.
        label_smoothing: Label smoothing of the token NLL (0.1).
        lr: AdamW learning rate of the adapter (1e-4).
        weight_decay: AdamW weight decay (0.0).
        dtype: ``auto`` (bf16 on CUDA, fp32 on CPU), ``bf16``, ``fp16`` or ``fp32``.
        quantization: ``4bit`` (NF4 base, CUDA + bitsandbytes) or None.
        gradient_checkpointing: Recompute activations in backward (less memory, ~30 % slower).
        attn_implementation: ``sdpa``, ``eager``, ``flash_attention_2`` or None (default).
        download: Allow downloading hub weights that are not cached.
        device: Where the VLM lives (``cpu``, ``cuda:1`` ...; default CPU). The policy may live
            elsewhere.
    """

    def __init__(
        self,
        backbone: str = "qwen2.5-vl-3b",
        *,
        lora_rank: PositiveInt = 128,
        lora_alpha: PositiveFloat = 16.0,
        lora_dropout: UnitFraction = 0.05,
        target_modules: Sequence[str] = LANGUAGE_LINEAR_LAYERS,
        label_smoothing: UnitFraction = 0.1,
        lr: PositiveFloat = 1e-4,
        weight_decay: float = 0.0,
        dtype: str = "auto",
        quantization: Quantization = None,
        gradient_checkpointing: bool = False,
        attn_implementation: str | None = None,
        download: bool = False,
        device: str | None = None,
    ) -> None:
        super().__init__()  # value ranges: the argument types, checked when a recipe is parsed
        self.save_hyperparameters()
        base, self.processor = load_backbone(
            backbone,
            device=device,
            dtype=dtype,
            quantization=quantization,
            gradient_checkpointing=gradient_checkpointing,
            attn_implementation=attn_implementation,
            download=download,
        )
        self.is_tiny: bool = base.covr_is_tiny
        self.model = self._add_lora(base, list(target_modules))
        trainable, total = self.model.get_nb_trainable_parameters()
        self.trainable_parameters, self.total_parameters = int(trainable), int(total)
        self.trainable_share = trainable / total
        log.info(
            "VLM %s: LoRA r=%d alpha=%g on %s; trainable %s of %s parameters (%.2f %%)",
            backbone, lora_rank, lora_alpha, ",".join(target_modules),
            f"{trainable:,}", f"{total:,}", 100 * self.trainable_share,
        )  # fmt: skip

    def _add_lora(self, base: nn.Module, target_modules: list[str]) -> nn.Module:
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        if self.hparams.quantization is not None:
            base = prepare_model_for_kbit_training(
                base, use_gradient_checkpointing=self.hparams.gradient_checkpointing
            )
        config = LoraConfig(
            r=self.hparams.lora_rank,
            lora_alpha=self.hparams.lora_alpha,
            lora_dropout=self.hparams.lora_dropout,
            target_modules=lora_target_regex(base, target_modules),
            bias="none",
        )
        try:
            with warnings.catch_warnings():
                # peft asks transformers a deprecated question; harmless until transformers 6.
                warnings.filterwarnings("ignore", "`is_gradient_checkpointing`", FutureWarning)
                return get_peft_model(base, config)
        except ValueError as error:  # no module matched
            raise ConfigError(
                f"vlm.target_modules {target_modules} match no linear layer of the language model "
                f"of {type(base).__name__}",
                f"use names such as {', '.join(LANGUAGE_LINEAR_LAYERS)}",
            ) from error

    # ----------------------------------------------------------------- training
    def sft_loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """RALW loss of one batch of :func:`~covr_lightning.vlm.prompting.encode_sft_batch`.

        Returns:
            ``(loss, metrics)`` with ``vlm/sft_loss``, ``vlm/token_accuracy`` (greedy argmax on
            target tokens) and ``vlm/target_tokens``.
        """
        target_mask = batch["target_mask"]
        answer_length = int(target_mask.sum(dim=1).max())
        if answer_length == 0:
            raise ValueError("the batch has no target tokens")
        keep = answer_length + 1  # logits of position p predict token p + 1
        inputs = {k: v for k, v in batch.items() if k not in _BATCH_ONLY_KEYS}
        logits = self.model(**inputs, logits_to_keep=keep, use_cache=False).logits
        labels = batch["input_ids"][:, -answer_length:]
        mask = target_mask[:, -answer_length:].to(torch.float32)
        nll = token_nll(logits[:, :-1], labels, self.hparams.label_smoothing)
        loss = ralw_loss(nll, mask, batch["weights"])
        with torch.no_grad():
            correct = (logits[:, :-1].argmax(-1) == labels).float() * mask
            accuracy = correct.sum() / mask.sum()
        return loss, {
            "vlm/sft_loss": loss.detach(),
            "vlm/token_accuracy": accuracy,
            "vlm/target_tokens": mask.sum(),
        }

    def training_step(self, batch: dict[str, Tensor], batch_idx: int = 0) -> Tensor:
        """One RALW step's loss (backward and optimizer step are the caller's)."""
        loss, metrics = self.sft_loss(batch)
        self.last_metrics = {k: float(v) for k, v in metrics.items()}
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """AdamW over the adapter's parameters only."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)

    # ----------------------------------------------------------------- adapter
    def adapter_state_dict(self) -> dict[str, Tensor]:
        """The LoRA weights (what a checkpoint needs; the base reloads from the backbone)."""
        from peft import get_peft_model_state_dict

        return {
            k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(self.model).items()
        }

    def load_adapter_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore LoRA weights saved by :meth:`adapter_state_dict`.

        Raises:
            ValueError: The state does not fit this adapter (other rank, backbone or targets).
        """
        from peft import set_peft_model_state_dict

        own = self.adapter_state_dict()
        mismatched = [k for k in own if k not in state or state[k].shape != own[k].shape]
        if mismatched or len(state) != len(own):
            raise ValueError(
                f"adapter weights do not fit this LoRA adapter ({len(mismatched)} missing or "
                f"differently shaped tensors, e.g. {mismatched[:1]})"
            )
        set_peft_model_state_dict(self.model, state)

    def save_adapter(self, folder: str | Path) -> Path:
        """Write the adapter in peft's format (``adapter_config.json`` + safetensors)."""
        folder = Path(folder)
        self.model.save_pretrained(folder)
        return folder

    def load_adapter(self, folder: str | Path) -> None:
        """Load adapter weights written by :meth:`save_adapter`."""
        from safetensors.torch import load_file

        path = Path(folder) / "adapter_model.safetensors"
        if not path.is_file():
            raise ConfigError(f"no LoRA adapter at {path}", "point at a folder from save_adapter")
        self.load_adapter_state_dict(load_file(path))
