"""Guidance from an inference server that speaks OpenAI's chat-completions protocol.

The VLM that guides the agent runs in a server the user already operates (vLLM or SGLang serving
Qwen2.5-VL, Qwen2-VL or LLaVA), not in the training process. Each frame becomes one
``POST {url}/chat/completions`` request with the frame as a PNG ``image_url`` data URL and the run's
prompt (system line, task, answer format) as text, greedy (``temperature`` 0). A batch of frames
is sent as concurrent requests, which the server batches itself (continuous batching); the guide
worker (:mod:`covr_lightning.guides.worker`) keeps the agent stepping meanwhile.

The training process still fine-tunes its own copy of the VLM. After each fine-tune the loop
saves the adapter and calls :meth:`ServedVLMGuide.adapter_saved`, which loads it into the server
under a fresh name (``vllm``: ``POST /v1/load_lora_adapter``; ``sglang``: ``POST
/load_lora_adapter``), sends later requests to it, and unloads the previous one. A fresh name per
round, because reloading under the same name can serve the old weights from the server's cache.

Guided decoding: with ``guided_decoding`` the request carries the codec's answer pattern
(:meth:`answer_pattern`) so the server can only write answers the codec reads (vLLM:
``structured_outputs.regex``; SGLang: ``regex``).

Failures never crash the run and never stall it silently: a request that times out, fails or
returns garbage makes that frame's prior invalid (masked out of the actor's loss, counted in
``guide/invalid_rate``) and logs one warning line per failure streak. A server that cannot be
reached when the run starts is a :class:`~covr_lightning.errors.ConfigError` (one line, exit 2).
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import numpy as np
from jsonargparse.typing import PositiveFloat, PositiveInt

from covr_lightning.errors import ConfigError
from covr_lightning.guides.base import Guide, GuideContext

log = logging.getLogger(__name__)

ServerKind = Literal["vllm", "sglang", "openai"]


class ServerError(RuntimeError):
    """A request the server did not answer with a usable completion."""


def image_data_url(frame: np.ndarray) -> str:
    """An RGB uint8 ``(H, W, 3)`` frame as a ``data:image/png;base64,...`` URL (lossless)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(frame)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def chat_messages(prompt: Any, frame: np.ndarray) -> list[dict]:
    """The prompt's chat turn in OpenAI's format: the image placeholder becomes the frame."""
    messages = []
    for message in prompt.messages():
        content = message["content"]
        if isinstance(content, list):
            content = [
                {"type": "image_url", "image_url": {"url": image_data_url(frame)}}
                if part.get("type") == "image"
                else part
                for part in content
            ]
        messages.append({"role": message["role"], "content": content})
    return messages


class ServedVLMGuide(Guide):
    """VLM priors from an OpenAI-compatible chat-completions server (vLLM, SGLang).

    Args:
        url: The server's OpenAI base URL, ending in ``/v1``.
        model: The served base model's name (what the server lists under ``/v1/models``).
        server: ``vllm`` or ``sglang`` (adapters pushed after every fine-tune, guided decoding),
            or ``openai`` (any other compatible server: neither, so the served VLM never learns;
            a warning says so).
        timeout_s: Seconds a request may take before its frame's prior is masked.
        concurrency: Requests in flight at once (the server batches them).
        max_new_tokens: ``max_tokens`` of a request.
        guided_decoding: Constrain answers to the codec's pattern (vllm and sglang only).
        api_key_env: Environment variable holding the server's API key, if it wants one (the key
            itself never goes into a recipe).
        check_server: Refuse to start when ``{url}/models`` does not answer.
        prompt: The run's :class:`~covr_lightning.vlm.prompting.ActionPrompt` (builder).
        codec: The env's action codec (builder).
    """

    def __init__(
        self,
        url: str = "http://localhost:8000/v1",
        model: str = "Qwen/Qwen2.5-VL-3B-Instruct",
        server: ServerKind = "vllm",
        timeout_s: PositiveFloat = 60.0,
        concurrency: PositiveInt = 32,
        max_new_tokens: PositiveInt = 64,
        guided_decoding: bool = True,
        api_key_env: str = "COVR_GUIDE_API_KEY",
        check_server: bool = True,
        *,
        prompt: Any = None,
        codec: Any = None,
    ) -> None:
        super().__init__()
        if prompt is None or codec is None:
            raise ValueError("ServedVLMGuide needs the run's prompt and codec")
        self.url = url.rstrip("/")
        self.root = self.url[: -len("/v1")] if self.url.endswith("/v1") else self.url
        self.base_model = model
        self.model = model  # what requests name: the base, then each round's adapter
        self.server = server
        self.timeout_s = float(timeout_s)
        self.max_new_tokens = int(max_new_tokens)
        self.prompt = prompt
        self.codec = codec
        self.api_key = os.environ.get(api_key_env) or None
        self.pattern = codec.answer_pattern() if guided_decoding and server != "openai" else None
        self.adapter_name: str | None = None
        self.failures = 0  # consecutive failed requests (the current streak)
        self.failed_requests = 0  # all failed requests so far
        self._count_lock = threading.Lock()  # requests fail on the pool's threads
        self._pool = ThreadPoolExecutor(max_workers=int(concurrency), thread_name_prefix="guide")
        if check_server:
            self.check()
        if server == "openai":
            log.warning(
                "guide server %s (server: openai): adapters are not pushed, so the served VLM "
                "guides with its base weights and never learns from the agent; use server: vllm "
                "or sglang for COVR's co-training",
                self.url,
            )

    @classmethod
    def build(cls, context: GuideContext, **init_args: Any) -> ServedVLMGuide:
        """The run's prompt and codec; the rest from the recipe."""
        return cls(**init_args, prompt=context.prompt, codec=context.codec)

    # --- HTTP ---------------------------------------------------------------------------------

    def _request(self, url: str, body: dict | None = None, reply_json: bool = True) -> dict:
        """One JSON request (GET without ``body``); :class:`ServerError` on any failure. Replies
        that are plain text (vLLM's adapter endpoints) are not parsed when ``reply_json`` is off."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(url, data=data, method="GET" if body is None else "POST")
        request.add_header("Content-Type", "application/json")
        if self.api_key:
            request.add_header("Authorization", f"Bearer {self.api_key}")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                text = response.read().decode()
        except urllib.error.HTTPError as err:
            detail = err.read().decode(errors="replace")[:200]
            raise ServerError(f"HTTP {err.code} from {url}: {detail}") from err
        except (urllib.error.URLError, TimeoutError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise ServerError(f"no answer from {url} ({reason})") from err
        if not reply_json:
            return {}
        try:
            return json.loads(text)
        except json.JSONDecodeError as err:
            raise ServerError(f"{url} answered with something that is not JSON") from err

    def check(self) -> None:
        """Refuse to start when the server does not answer ``GET {url}/models``."""
        try:
            self._request(f"{self.url}/models")
        except ServerError as err:
            raise ConfigError(
                f"guide server: {err}",
                f"start the server (docs/scaling.md, e.g. `vllm serve {self.base_model} "
                "--enable-lora`), fix guide.init_args.url, or use the in-process "
                "guide (remove guide.class_path)",
            ) from err

    def completion_body(self, frame: np.ndarray) -> dict:
        """The chat-completions request of one frame."""
        body: dict[str, Any] = {
            "model": self.model,
            "messages": chat_messages(self.prompt, frame),
            "max_tokens": self.max_new_tokens,
            "temperature": 0.0,
        }
        if self.pattern is not None:
            if self.server == "vllm":
                body["structured_outputs"] = {"regex": self.pattern}
            else:
                body["regex"] = self.pattern
        return body

    def answer(self, frame: np.ndarray) -> str:
        """The server's answer text for one frame; :class:`ServerError` if there is none."""
        reply = self._request(f"{self.url}/chat/completions", self.completion_body(frame))
        try:
            text = reply["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError) as err:
            raise ServerError("the reply has no choices[0].message.content") from err
        if not isinstance(text, str):
            raise ServerError("the reply's message content is not text")
        return text

    # --- Guide --------------------------------------------------------------------------------

    def _answer_or_none(self, frame: np.ndarray) -> str | None:
        try:
            text = self.answer(frame)
        except ServerError as err:
            with self._count_lock:
                self.failed_requests += 1
                self.failures += 1
                streak = self.failures
            if streak == 1 or streak % 100 == 0:
                log.warning(
                    "guide server: %s; the frame's prior is masked (%d in a row)", err, streak
                )
            return None
        with self._count_lock:
            streak, self.failures = self.failures, 0
        if streak:
            log.warning("guide server answers again after %d failed requests", streak)
        return text

    def _propose(self, frames: np.ndarray, obs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        texts = list(self._pool.map(self._answer_or_none, list(frames)))
        actions = np.zeros((len(frames), self.codec.action_dim), dtype=np.float32)
        valid = np.zeros(len(frames), dtype=bool)
        for i, text in enumerate(texts):
            if text is not None:
                actions[i], valid[i] = self.codec.decode(text)
        return actions, valid

    def adapter_saved(self, folder: Path, name: str) -> None:
        """Serve the adapter in ``folder`` under ``name`` from now on; unload the previous one.

        ``folder`` must be readable by the server at the same path (a shared file system when it
        runs on another machine). A failed load is a :class:`ConfigError`: guidance would silently
        go on with stale weights otherwise.
        """
        if self.server == "openai":
            return
        prefix = f"{self.root}/v1" if self.server == "vllm" else self.root
        try:
            self._request(
                f"{prefix}/load_lora_adapter",
                {"lora_name": name, "lora_path": str(Path(folder).resolve())},
                reply_json=False,
            )
        except ServerError as err:
            hint = (
                "start vLLM with --enable-lora --max-lora-rank R and "
                "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True"
                if self.server == "vllm"
                else "start SGLang with --enable-lora --max-lora-rank R"
            )
            raise ConfigError(
                f"guide server could not load the adapter {name} from {folder}: {err}",
                f"{hint}, and make the run directory readable by the server at the same path",
            ) from err
        previous, self.adapter_name = self.adapter_name, name
        # vLLM names an adapter by its own name; SGLang as "base:adapter".
        self.model = name if self.server == "vllm" else f"{self.base_model}:{name}"
        if previous is not None:
            try:
                self._request(
                    f"{prefix}/unload_lora_adapter", {"lora_name": previous}, reply_json=False
                )
            except ServerError as err:  # the new adapter serves; an extra one only costs memory
                log.warning("guide server: could not unload adapter %s: %s", previous, err)

    def close(self) -> None:
        """Stop the request threads."""
        self._pool.shutdown(wait=False, cancel_futures=True)
