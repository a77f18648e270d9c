"""The server's text is exact on stories260K (a llama2.c SentencePiece model): a completion, its stream, its
echo and its logprob tokens and offsets all agree with transformers' decode(prompt + output), the first
generated token keeping its leading space ("Once upon" + " a time", never "Once upona time")."""

from __future__ import annotations

import json

import httpx
import pytest
from helpers import serve_in_thread
from transformers import AutoTokenizer

from optcli.engine.async_engine import AsyncEngine
from optcli.engine.engine import Engine
from optcli.engine.sampling_params import SamplingParams
from optcli.serve.app import create_app
from optcli.serve.routes_chat import fallback_chat_prompt

MODEL = "stories"
PROMPT = "Once upon"
MESSAGES = [{"role": "user", "content": "Tell me a story."}]
N = 24


@pytest.fixture(scope="module")
def server(stories_dir):
    tok = AutoTokenizer.from_pretrained(stories_dir)
    engine = Engine(str(stories_dir), dtype="float32", max_num_seqs=4)
    params = SamplingParams(max_tokens=N, ignore_eos=True)
    chat_ids = tok(fallback_chat_prompt(MESSAGES) + "assistant:").input_ids  # add_generation_prompt
    # references before the server owns the engine (greedy, so the server generates the same ids)
    out, chat = engine.generate([PROMPT, chat_ids], params)
    aengine = AsyncEngine(engine)
    with serve_in_thread(create_app(aengine, MODEL)) as base, httpx.Client(base_url=base, timeout=60) as client:
        yield {"client": client, "tok": tok, "out": out, "chat": chat, "chat_ids": chat_ids}
    aengine.shutdown(10)


def _decode(tok, ids: list[int]) -> str:
    return tok.decode(ids, skip_special_tokens=True)


def _completion(server, **body) -> dict:
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": N, "temperature": 0, "ignore_eos": True, **body}
    r = server["client"].post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


def _stream(server, path: str, body: dict) -> list[dict]:
    chunks = []
    with server["client"].stream("POST", path, json={"model": MODEL, "stream": True, **body}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[6:]))
    return [c["choices"][0] for c in chunks if c["choices"]]


def _check_offsets(text: str, lp: dict) -> None:
    """Every token sits at its offset in the text, and the tokens tile the text."""
    assert "".join(lp["tokens"]) == text
    for tok, off in zip(lp["tokens"], lp["text_offset"], strict=True):
        assert text[off : off + len(tok)] == tok


def test_completion_stream_and_echo_are_exact(server) -> None:
    tok, out = server["tok"], server["out"]
    whole = _decode(tok, out.prompt_token_ids + out.token_ids)
    assert out.token_ids[:3] == [261, 378, 432] and whole.startswith("Once upon a time,")
    expected = whole[len(PROMPT) :]
    assert _completion(server)["text"] == expected
    assert _completion(server, prompt=out.prompt_token_ids)["text"] == expected
    streamed = _stream(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": N, "temperature": 0,
                                                   "ignore_eos": True})
    assert "".join(c["text"] for c in streamed) == expected
    assert _completion(server, echo=True)["text"] == whole
    cut = _completion(server, stop=[" time"])
    assert cut["text"] == " a" and cut["finish_reason"] == "stop"


def test_logprob_tokens_and_offsets_are_exact(server) -> None:
    tok, out = server["tok"], server["out"]
    whole = _decode(tok, out.prompt_token_ids + out.token_ids)
    plain = _completion(server, logprobs=1)
    _check_offsets(plain["text"], plain["logprobs"])
    assert plain["logprobs"]["tokens"][:3] == [" a", " time", ","]
    echo = _completion(server, logprobs=1, echo=True)
    assert echo["text"] == whole
    _check_offsets(whole, echo["logprobs"])
    assert echo["logprobs"]["text_offset"][len(out.prompt_token_ids)] == len(PROMPT)
    streamed = _stream(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": N, "temperature": 0,
                                                   "ignore_eos": True, "logprobs": 1, "echo": True})
    text = "".join(c["text"] for c in streamed)
    lp = {k: [x for c in streamed if c["logprobs"] for x in c["logprobs"][k]] for k in ("tokens", "text_offset")}
    assert text == whole
    _check_offsets(text, lp)


def test_chat_content_is_exact(server) -> None:
    tok, chat = server["tok"], server["chat"]
    ids = server["chat_ids"]
    expected = _decode(tok, ids + chat.token_ids)[len(_decode(tok, ids)) :]
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": N, "temperature": 0, "ignore_eos": True}
    r = server["client"].post("/v1/chat/completions", json={**body, "logprobs": True})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["message"]["content"] == expected
    content = choice["logprobs"]["content"]
    assert "".join(c["token"] for c in content) == expected
    assert b"".join(bytes(c["bytes"]) for c in content) == expected.encode()
    streamed = _stream(server, "/v1/chat/completions", {k: v for k, v in body.items() if k != "model"})
    assert "".join(c["delta"].get("content") or "" for c in streamed) == expected
