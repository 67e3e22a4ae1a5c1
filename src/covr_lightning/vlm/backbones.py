"""Load a vision-language model and its processor by short name, hub id or local folder.

``load_backbone(name_or_path, **options) -> (model, processor)`` is the one way the package gets a
VLM. Names resolve in this order:

1. ``tiny-qwen2.5-vl``: the tiny offline model of :mod:`covr_lightning.vlm.tiny` (built on first use).
2. A short name of :data:`SHORT_NAMES` (``qwen2.5-vl-3b`` -> ``Qwen/Qwen2.5-VL-3B-Instruct`` ...).
3. An existing local folder (a ``save_pretrained`` copy).
4. A hub id (``owner/name``), read from the Hugging Face cache (``$HF_HOME/hub``).

Nothing downloads unless ``download=True`` (recipe ``vlm.download: true``) and the hub is online
(``HF_HUB_OFFLINE`` unset): weights of several GB should not start streaming in the middle of a
training run by surprise. Missing weights raise :class:`BackboneNotFoundError`, one line saying what
is missing, where it looked and how to get it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Literal

import torch

from covr_lightning.errors import ConfigError
from covr_lightning.vlm.processor import load_processor
from covr_lightning.vlm.quiet import quiet_progress
from covr_lightning.vlm.tiny import TINY_NAME, ensure_tiny_backbone

log = logging.getLogger(__name__)

SHORT_NAMES = {
    "qwen2.5-vl-3b": "Qwen/Qwen2.5-VL-3B-Instruct",
    "qwen2.5-vl-7b": "Qwen/Qwen2.5-VL-7B-Instruct",
    "qwen2-vl-2b": "Qwen/Qwen2-VL-2B-Instruct",
    "qwen2-vl-7b": "Qwen/Qwen2-VL-7B-Instruct",
    "llava-1.5-7b": "llava-hf/llava-1.5-7b-hf",
}
"""Short names users type in recipes, and the hub ids they stand for."""

Quantization = Literal["4bit"] | None


class BackboneNotFoundError(ConfigError):
    """The VLM's weights are not on this machine (and downloading is off or impossible)."""


def hf_home() -> str:
    """Where the Hugging Face cache lives (for messages)."""
    from huggingface_hub import constants

    return constants.HF_HOME


def resolve_backbone(name_or_path: str, download: bool = False) -> tuple[Path, bool]:
    """Local folder holding the model, and whether it is the tiny untrained one.

    Raises:
        BackboneNotFoundError: A hub model that is not cached (and may not or cannot download).
    """
    if name_or_path == TINY_NAME:
        return ensure_tiny_backbone(), True
    repo_id = SHORT_NAMES.get(name_or_path.lower(), name_or_path)
    local = Path(repo_id).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise BackboneNotFoundError(
                f"VLM folder {local} has no config.json",
                "point vlm.backbone at a folder written by save_pretrained, a hub id or a short "
                f"name ({', '.join([TINY_NAME, *SHORT_NAMES])})",
            )
        return local, (local / "COVR_TINY_MODEL.txt").is_file()
    if repo_id.startswith((".", "/", "~")) or repo_id.count("/") != 1:
        if repo_id.startswith((".", "/", "~")):
            raise BackboneNotFoundError(
                f"VLM folder {local} does not exist", "check the path given as vlm.backbone"
            )
        raise BackboneNotFoundError(
            f"unknown VLM backbone {name_or_path!r} (not a short name, a folder or a hub id)",
            f"use one of {', '.join([TINY_NAME, *SHORT_NAMES])}, a hub id like "
            "Qwen/Qwen2.5-VL-3B-Instruct or a local folder",
        )
    return _from_hub(repo_id, download), False


def _from_hub(repo_id: str, download: bool) -> Path:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
    try:
        return Path(snapshot_download(repo_id, local_files_only=True, allow_patterns=patterns))
    except LocalEntryNotFoundError:
        pass
    offline = constants.HF_HUB_OFFLINE
    if download and not offline:
        try:
            log.warning("downloading %s to %s (several GB)", repo_id, constants.HF_HUB_CACHE)
            return Path(snapshot_download(repo_id, allow_patterns=patterns))
        except Exception as error:  # network, auth or disk: all end the same way for the user
            raise BackboneNotFoundError(
                f"could not download VLM {repo_id}: {type(error).__name__}: {error}",
                "check the network and `hf auth login`, or download it elsewhere and copy HF_HOME",
            ) from error
    why = "HF_HUB_OFFLINE is set" if offline else "vlm.download is false"
    raise BackboneNotFoundError(
        f"VLM weights for {repo_id} are not in the Hugging Face cache at {hf_home()} ({why})",
        f"download them once with `hf download {repo_id}` (or on another machine and copy HF_HOME), "
        f"set vlm.download=true, pass a local folder as vlm.backbone, or try vlm.backbone={TINY_NAME}",
    )


def default_dtype(device: torch.device | str | None) -> torch.dtype:
    """bf16 on a CUDA device that supports it, fp32 elsewhere (CPU bf16 matmuls are slow)."""
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def _dtype(value: str | torch.dtype | None, device) -> torch.dtype:
    if value is None or value == "auto":
        return default_dtype(device)
    if isinstance(value, torch.dtype):
        return value
    names = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
             "float16": torch.float16, "fp32": torch.float32, "float32": torch.float32}  # fmt: skip
    if value not in names:
        raise ConfigError(f"unknown VLM dtype {value!r}", f"use one of auto, {', '.join(names)}")
    return names[value]


def quantization_config(quantization: Quantization, device):
    """``BitsAndBytesConfig`` for a 4-bit NF4 base with bf16 compute, or None.

    Raises:
        ConfigError: 4-bit asked for without a CUDA device or without bitsandbytes.
    """
    if quantization is None:
        return None
    if quantization != "4bit":
        raise ConfigError(f"unknown VLM quantization {quantization!r}", "use 4bit or null")
    if not torch.cuda.is_available() or torch.device(device or "cuda").type != "cuda":
        raise ConfigError(
            "4-bit quantization needs a CUDA GPU (bitsandbytes) and none is in use here",
            "set vlm.quantization=null on this machine",
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as error:
        raise ConfigError(
            "4-bit quantization needs bitsandbytes, which is not installed",
            "pip install 'covr-lightning[quant]'",
        ) from error
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_use_double_quant=True,
    )


def load_backbone(
    name_or_path: str,
    *,
    device: torch.device | str | None = None,
    dtype: str | torch.dtype | None = "auto",
    quantization: Quantization = None,
    gradient_checkpointing: bool = False,
    attn_implementation: str | None = None,
    download: bool = False,
):
    """Load a Hugging Face vision-language model and its processor.

    Args:
        name_or_path: ``tiny-qwen2.5-vl``, a short name of :data:`SHORT_NAMES`, a local folder or
            a hub id.
        device: Where to put the model (default CPU; 4-bit loads straight onto the GPU).
        dtype: ``auto`` (bf16 on CUDA, fp32 on CPU), ``bf16``, ``fp16`` or ``fp32``.
        quantization: ``4bit`` for an NF4 base through bitsandbytes (CUDA only), or None.
        gradient_checkpointing: Recompute activations in the backward pass (less memory).
        attn_implementation: ``sdpa``, ``eager``, ``flash_attention_2`` or None (transformers'
            default).
        download: Allow a download from the hub when the weights are not cached.

    Returns:
        ``(model, processor)``; the model is in eval mode with ``model.covr_is_tiny`` telling
        whether it is the tiny untrained backbone.

    Raises:
        BackboneNotFoundError: Weights not found (message says how to get them).
        ConfigError: Bad options (unknown dtype, 4-bit without CUDA or bitsandbytes).
    """
    from transformers import AutoConfig, AutoModelForImageTextToText

    folder, is_tiny = resolve_backbone(name_or_path, download=download)
    quant = quantization_config(quantization, device)
    config = AutoConfig.from_pretrained(folder)
    kwargs = {"dtype": _dtype(dtype, device)}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if quant is not None:
        kwargs.update(quantization_config=quant, device_map={"": torch.device(device or "cuda")})
    try:
        with quiet_progress(is_tiny):  # a loading bar for 56 tiny tensors is noise
            model = AutoModelForImageTextToText.from_pretrained(folder, **kwargs)
    except (OSError, ValueError) as error:
        raise BackboneNotFoundError(
            f"could not load the VLM from {folder}: {str(error).splitlines()[0]}",
            "re-download it (the copy may be partial) or pick another vlm.backbone",
        ) from error
    if quant is None and device is not None:
        model.to(device)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.eval()
    model.covr_is_tiny = is_tiny
    processor = load_processor(folder, config.model_type)
    if is_tiny:
        log.warning(
            "VLM backbone %s is the tiny, randomly initialised test model (%s parameters), "
            "not a pretrained VLM: its guidance is noise until fine-tuned",
            name_or_path,
            f"{sum(p.numel() for p in model.parameters()):,}",
        )
    return model, processor


def environment_summary() -> str:
    """One line on where weights come from (for ``docs`` and error reports)."""
    return f"HF_HOME={hf_home()} HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '0')}"
