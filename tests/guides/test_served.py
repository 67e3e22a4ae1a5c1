"""The served guide against a real HTTP server that speaks vLLM's protocol and serves the tiny VLM.

What is checked: the request (image as a lossless PNG data URL, the run's prompt through the
server's chat template, greedy, the codec's pattern for guided decoding), answers equal to the
in-process guide's for the same weights, adapters pushed under a fresh name per round with the
previous one unloaded, a COVR run guided through the server, and every failure (server down,
HTTP errors, garbage, timeouts) as a masked prior or one line, never a crash.
"""

from __future__ import annotations

import re
import socket

import numpy as np
import pytest
import torch

from covr_lightning.errors import ConfigError
from covr_lightning.guides.served import ServedVLMGuide
from covr_lightning.vlm.codecs import make_codec
from covr_lightning.vlm.guide import VLMGuide
from covr_lightning.vlm.module import VLMLoRAModule
from covr_lightning.vlm.prompting import ActionPrompt
from covr_lightning.vlm.tiny import ensure_tiny_backbone
from tests.guides.chat_server import ChatServer
from tests.helpers import distinct_frames

CODEC = make_codec("numeric", -np.ones(2), np.ones(2))
PROMPT = ActionPrompt("swing the pole up and balance it", CODEC.describe())
FRAMES = distinct_frames(4, size=56)


def _vlm(seed: int) -> VLMLoRAModule:
    ensure_tiny_backbone()
    torch.manual_seed(seed)
    vlm = VLMLoRAModule("tiny-qwen2.5-vl", lora_rank=4, lora_alpha=8, lora_dropout=0.0)
    with torch.no_grad():  # LoRA B starts at zero: make the adapter matter
        for name, param in vlm.model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    return vlm


@pytest.fixture(scope="module")
def served():
    """The server's VLM (seed 1) and a client-side copy with the same weights."""
    server_vlm, client_vlm = _vlm(1), _vlm(2)
    client_vlm.load_adapter_state_dict(server_vlm.adapter_state_dict())
    with ChatServer(server_vlm, PROMPT, CODEC) as server:
        yield server, client_vlm


def _guide(chat: ChatServer, **kwargs) -> ServedVLMGuide:
    return ServedVLMGuide(chat.url, model=chat.model, prompt=PROMPT, codec=CODEC, **kwargs)


def test_requests_follow_the_protocol_and_answers_match_the_in_process_guide(served):
    server, client_vlm = served
    server.mode, start = "ok", len(server.requests)
    guide = _guide(server, concurrency=2)
    texts = [guide.answer(frame) for frame in FRAMES]
    local = VLMGuide(client_vlm, PROMPT, CODEC, batch_size=1)
    assert texts == local.generate_text(FRAMES)  # same weights, same prompt: same answers
    assert server.prompts[-1] == local.prompt_text  # the chat template saw the run's prompt
    assert all(np.array_equal(a, b) for a, b in zip(server.images[-4:], FRAMES, strict=True))
    body = server.requests[start]
    assert body["temperature"] == 0.0 and body["model"] == server.model
    assert body["structured_outputs"]["regex"] == CODEC.answer_pattern()
    actions, valid = guide.propose(FRAMES)
    for text, action, ok in zip(texts, actions, valid, strict=True):
        expected, expected_ok = CODEC.decode(text)
        assert ok == expected_ok and np.allclose(action, expected)
    guide.close()


def test_sglang_gets_the_pattern_as_regex_and_none_without_guided_decoding(served):
    server, _ = served
    guide = _guide(server, server="sglang", check_server=False)
    body = guide.completion_body(FRAMES[0])
    assert body["regex"] == CODEC.answer_pattern() and "structured_outputs" not in body
    assert "structured_outputs" not in _guide(server, guided_decoding=False).completion_body(
        FRAMES[0]
    )


def test_adapters_are_loaded_under_a_fresh_name_and_the_previous_unloaded(served, tmp_path):
    server, client_vlm = served
    server.mode = "ok"
    guide = _guide(server)
    rounds = []
    for index in range(2):
        with torch.no_grad():  # a "fine-tune": new adapter weights on the training side
            for name, param in client_vlm.model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.5)
        folder = client_vlm.save_adapter(tmp_path / f"round_{index}")
        guide.adapter_saved(folder, f"run-round{index}")
        rounds.append(guide.answer(FRAMES[0]))
        assert server.requests[-1]["model"] == f"run-round{index}"
        local = VLMGuide(client_vlm, PROMPT, CODEC, batch_size=1)
        assert rounds[-1] == local.generate_text(FRAMES[:1])[0]  # the new weights answer
    assert server.events[-3:] == [
        ("load", "run-round0"),
        ("load", "run-round1"),
        ("unload", "run-round0"),
    ]
    assert set(server.adapters) == {"run-round1"}


def test_an_adapter_the_server_refuses_is_one_line(served, tmp_path):
    server, client_vlm = served
    guide = _guide(server)
    folder = client_vlm.save_adapter(tmp_path / "round_0")
    guide.adapter_saved(folder, "twice")
    with pytest.raises(ConfigError, match="could not load the adapter twice") as err:
        guide.adapter_saved(folder, "twice")  # the same name again: HTTP 400 from the server
    assert "Fix:" in err.value.line() and "\n" not in err.value.line()


@pytest.mark.parametrize("mode", ["error", "garbage", "slow"])
def test_a_failing_server_masks_the_prior_and_recovers(served, mode, caplog):
    server, _ = served
    guide = _guide(server, timeout_s=0.5)
    server.mode, server.delay_s = mode, 1.5
    actions, valid = guide.propose(FRAMES)
    assert not valid.any() and np.allclose(actions, 0.0)  # the middle of [-1, 1], masked
    assert guide.failed_requests == 4 and guide.pop_invalid_rate() == 1.0
    assert "the frame's prior is masked" in caplog.text
    server.mode = "ok"
    guide.propose(FRAMES[:1])
    assert guide.failures == 0 and "answers again after" in caplog.text


def test_a_server_that_is_down_is_one_line():
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(ConfigError) as err:
        ServedVLMGuide(f"http://127.0.0.1:{port}/v1", prompt=PROMPT, codec=CODEC)
    line = err.value.line()
    assert re.search(r"guide server: no answer from http://127\.0\.0\.1:\d+/v1/models", line)
    assert "vllm serve" in line and "\n" not in line


def test_a_covr_run_is_guided_through_the_server_and_pushes_each_round(workdir):
    from tests.loop.test_covr_loop import COVR_TINY, _loop

    vlm = _vlm(3)
    prompt = ActionPrompt("swing the pole up and balance it", "")
    codec = make_codec("numeric", -np.ones(1), np.ones(1))
    with ChatServer(vlm, prompt, codec) as server:
        loop = _loop(
            [
                *COVR_TINY,
                "tracking.enabled=false",
                "guide.class_path=covr_lightning.guides.served.ServedVLMGuide",
                f"guide.init_args.url={server.url}",
                f"guide.init_args.model={server.model}",
            ],
            "served",
        )
        loop.fit()
        fine_tunes = sorted(p.name for p in (loop.run_dir / "adapters").iterdir())
        loads = [name for kind, name in server.events if kind == "load"]
        assert loads == [f"served-{f.replace('_', '')}" for f in fine_tunes] and loads
        assert [name for kind, name in server.events if kind == "unload"] == loads[:-1]
        assert server.requests  # guided rounds asked the server
        assert {r["model"] for r in server.requests} <= {server.model, *loads}


def test_a_resumed_run_hands_the_server_its_latest_adapter(workdir):
    from tests.loop.test_covr_loop import COVR_TINY, _loop

    vlm = _vlm(4)
    prompt = ActionPrompt("swing the pole up and balance it", "")
    codec = make_codec("numeric", -np.ones(1), np.ones(1))
    with ChatServer(vlm, prompt, codec) as server:
        loop = _loop(
            [
                *COVR_TINY,
                "tracking.enabled=false",
                "guide.class_path=covr_lightning.guides.served.ServedVLMGuide",
                f"guide.init_args.url={server.url}",
                f"guide.init_args.model={server.model}",
            ],
            "resumed",
        )
        loop._push_latest_adapter()  # a fresh run: nothing saved, nothing loaded
        assert server.events == []
        for index in (0, 1):
            loop.vlm.save_adapter(loop.run_dir / "adapters" / f"round_{index}")
        loop.round_index = 2  # as a checkpoint taken in round 2 restores it
        loop._push_latest_adapter()
        assert server.events == [("load", "resumed-round1")]
        assert server.adapters["resumed-round1"].endswith("adapters/round_1")
        loop.close()
