"""A small OpenAI-compatible chat-completions server for tests, serving the tiny VLM for real.

It speaks the parts of vLLM's protocol the served guide uses: ``GET /v1/models``, ``POST
/v1/chat/completions`` (image ``image_url`` data URLs, greedy), ``POST /v1/load_lora_adapter`` and
``/v1/unload_lora_adapter`` (plain-text replies, as vLLM's). Requests name the base model or a
loaded adapter; an unknown name is a 404 with vLLM's error shape. Answers come from the tiny
Qwen2.5-VL-architecture model through the chat template applied to the received messages, so a
test can compare them with the in-process guide's. ``mode`` makes it misbehave: ``error`` (HTTP
500), ``garbage`` (200 with a body that is not JSON), ``slow`` (answers after ``delay_s``).
"""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
from PIL import Image

from covr_lightning.vlm.guide import VLMGuide

PNG_PREFIX = "data:image/png;base64,"


def decode_image(url: str) -> np.ndarray:
    assert url.startswith(PNG_PREFIX), url[:40]
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(url[len(PNG_PREFIX) :]))))


class ChatServer:
    """Serve ``vlm`` as ``model`` on a free localhost port (``with ChatServer(...) as server``)."""

    def __init__(self, vlm, prompt, codec, model: str = "tiny-qwen2.5-vl") -> None:
        self.vlm = vlm
        self.guide = VLMGuide(vlm, prompt, codec, batch_size=1)
        self.model = model
        self.adapters: dict[str, str] = {}
        self.events: list[tuple[str, str]] = []  # ("load" | "unload", adapter name)
        self.requests: list[dict] = []
        self.prompts: list[str] = []
        self.images: list[np.ndarray] = []
        self.mode = "ok"
        self.delay_s = 0.0
        self._lock = threading.Lock()  # one generation at a time
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def __enter__(self) -> ChatServer:
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    # --- what the endpoints do ----------------------------------------------------------------

    def complete(self, body: dict) -> tuple[int, str]:
        if body["model"] not in {self.model, *self.adapters}:
            error = {"message": f"The model `{body['model']}` does not exist.", "code": 404}
            return 404, json.dumps({"object": "error", **error})
        messages, images = [], []
        for message in body["messages"]:
            content = message["content"]
            if isinstance(content, list):
                parts = []
                for part in content:
                    if part["type"] == "image_url":
                        images.append(decode_image(part["image_url"]["url"]))
                        parts.append({"type": "image"})
                    else:
                        parts.append(part)
                content = parts
            messages.append({"role": message["role"], "content": content})
        prompt = self.vlm.processor.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        with self._lock:
            self.requests.append(body)
            self.prompts.append(prompt)
            self.images.extend(images)
            self.guide.prompt_text = prompt  # generate after exactly what was received
            text = self.guide.generate_text(np.stack(images))[0]
        reply = {
            "id": f"chatcmpl-{len(self.requests)}",
            "object": "chat.completion",
            "model": body["model"],
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "stop",
                }
            ],
        }
        return 200, json.dumps(reply)

    def load_adapter(self, body: dict) -> tuple[int, str]:
        name, path = body["lora_name"], body["lora_path"]
        if name in self.adapters:
            return 400, json.dumps(
                {"message": f"The lora adapter '{name}' has already been loaded."}
            )
        with self._lock:
            self.vlm.load_adapter(path)  # serve its weights from now on
            self.adapters[name] = path
            self.events.append(("load", name))
        return 200, f"Success: LoRA adapter '{name}' added successfully."

    def unload_adapter(self, body: dict) -> tuple[int, str]:
        name = body["lora_name"]
        if self.adapters.pop(name, None) is None:
            return 404, json.dumps({"message": f"The lora adapter '{name}' cannot be found."})
        self.events.append(("unload", name))
        return 200, f"Success: LoRA adapter '{name}' removed successfully."

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet
                pass

            def _send(self, status: int, text: str) -> None:
                data = text.encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                if self.path == "/v1/models":
                    ids = [server.model, *server.adapters]
                    self._send(
                        200, json.dumps({"object": "list", "data": [{"id": i} for i in ids]})
                    )
                else:
                    self._send(404, json.dumps({"message": "not found"}))

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path == "/v1/chat/completions":
                    if server.mode == "error":
                        return self._send(500, json.dumps({"message": "engine died"}))
                    if server.mode == "garbage":
                        return self._send(200, "<html>proxy error</html>")
                    if server.mode == "slow":
                        time.sleep(server.delay_s)
                    return self._send(*server.complete(body))
                if self.path == "/v1/load_lora_adapter":
                    return self._send(*server.load_adapter(body))
                if self.path == "/v1/unload_lora_adapter":
                    return self._send(*server.unload_adapter(body))
                self._send(404, json.dumps({"message": "not found"}))

        return Handler
