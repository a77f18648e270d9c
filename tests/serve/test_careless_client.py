"""A scripted pass over what a careless user and a hostile client send the OpenAI-compatible server.

Every request parameter is honoured (the output changes as asked, and equals the engine's Python API
given the same settings) or refused with a 400 that names it; none is accepted and ignored. Nothing a
client sends gets a 5xx: lone surrogates, 2,000-level nesting, huge numbers, NaN, hypothesis-made
strings and numbers.
"""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from optcli.engine import Engine, SamplingParams
from optcli.engine.async_engine import AsyncEngine
from optcli.serve.app import create_app
from optcli.serve.protocol import ChatCompletionRequest, CompletionRequest

MODEL = "tiny"
PROMPT = "Once upon a time"
C, CHAT = "/v1/completions", "/v1/chat/completions"
ENGINE_ARGS = {"dtype": "float32", "max_num_seqs": 8, "max_model_len": 512}
SAMPLED = {"temperature": 1.0, "seed": 3, "max_tokens": 24, "ignore_eos": True}
SCHEMA = {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]},
                                           "size": {"type": "integer", "minimum": 0, "maximum": 99}},
          "required": ["color", "size"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}}, "required": ["city"],
    "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
    "additionalProperties": False}}}


@pytest.fixture(scope="module")
def env():
    aengine = AsyncEngine(Engine("builtin:tiny-llama", **ENGINE_ARGS))
    app = create_app(aengine, MODEL, request_timeout_s=60)
    ref = Engine("builtin:tiny-llama", **ENGINE_ARGS)  # the Python API, for "the same settings, the same output"
    with TestClient(app, raise_server_exceptions=False) as client:
        yield {"client": client, "ref": ref, "ids": ref.tokenizer(PROMPT).input_ids}
    aengine.shutdown(10)


def post(env, path: str, body: dict):
    r = env["client"].post(path, json=body)
    assert r.status_code < 500, (path, body, r.text[:300])
    return r


def post_raw(env, path: str, raw: bytes):
    r = env["client"].post(path, content=raw, headers={"Content-Type": "application/json"})
    assert r.status_code < 500, (path, raw[:200], r.text[:300])
    return r


def refused(r, param: str) -> None:
    assert r.status_code == 400, r.text[:300]
    error = r.json()["error"]
    assert error["param"] == param, error
    assert "Traceback" not in r.text


def completion(env, **extra) -> dict:
    r = post(env, C, {"model": MODEL, "prompt": PROMPT, **SAMPLED, **extra})
    assert r.status_code == 200, r.text[:300]
    return r.json()


def reference(env, **kw) -> list:
    return env["ref"].generate([env["ids"]], SamplingParams(**{**SAMPLED, **kw}))[0].outputs


def _common_token(env) -> int:
    out = reference(env)[0].token_ids
    return max(set(out), key=out.count)


# --- honoured: the output changes as asked and equals the Python API's ---------------------------------
def test_sampling_parameters_are_honoured(env) -> None:
    base = reference(env)[0]
    common = _common_token(env)
    stop_at = base.token_ids[5]
    cases = [
        ({"logit_bias": {str(common): -100}}, {"logit_bias": {common: -100.0}}),
        ({"presence_penalty": 2}, {"presence_penalty": 2.0}),
        ({"frequency_penalty": 2}, {"frequency_penalty": 2.0}),
        ({"repetition_penalty": 1.8}, {"repetition_penalty": 1.8}),
        ({"min_p": 0.5}, {"min_p": 0.5}),
        ({"top_k": 2}, {"top_k": 2}),
        ({"top_p": 0.3}, {"top_p": 0.3}),
        ({"stop_token_ids": [stop_at]}, {"stop_token_ids": [stop_at]}),
        ({"allowed_token_ids": [300, 301, 302]}, {"allowed_token_ids": [300, 301, 302]}),
        ({"ignore_eos": False, "logit_bias": {"2": 8}}, {"ignore_eos": False, "logit_bias": {2: 8.0}}),
    ]
    for body, kw in cases:
        got = completion(env, **body)["choices"][0]["text"]
        want = reference(env, **kw)[0]
        assert got == want.text, body
        assert want.token_ids != base.token_ids, f"{body} changed nothing"
    assert common not in reference(env, logit_bias={common: -100.0})[0].token_ids
    assert set(reference(env, allowed_token_ids=[300, 301, 302])[0].token_ids) <= {300, 301, 302}


def test_min_tokens_holds_off_eos(env) -> None:
    eager = completion(env, logit_bias={"2": 100}, ignore_eos=False)
    assert eager["choices"][0]["finish_reason"] == "stop" and eager["usage"]["completion_tokens"] == 1
    held = completion(env, logit_bias={"2": 100}, ignore_eos=False, min_tokens=5)
    assert held["usage"]["completion_tokens"] == 6 and held["choices"][0]["finish_reason"] == "stop"


def test_n_and_best_of(env) -> None:
    out = completion(env, n=3)
    assert [c["index"] for c in out["choices"]] == [0, 1, 2]
    assert [c["text"] for c in out["choices"]] == [o.text for o in reference(env, n=3)]
    assert len({c["text"] for c in out["choices"]}) == 3
    best = completion(env, n=2, best_of=5)
    assert [c["text"] for c in best["choices"]] == [o.text for o in reference(env, n=2, best_of=5)]
    two_prompts = post(env, C, {"model": MODEL, "prompt": [PROMPT, "The cat"], **SAMPLED, "n": 2}).json()
    assert [c["index"] for c in two_prompts["choices"]] == [0, 1, 2, 3]
    chat = post(env, CHAT, {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **SAMPLED, "n": 2})
    assert [c["index"] for c in chat.json()["choices"]] == [0, 1]
    # streamed n: each choice's deltas add up to the non-streamed text
    r = env["client"].post(C, json={"model": MODEL, "prompt": PROMPT, **SAMPLED, "n": 2, "stream": True})
    texts = ["", ""]
    for line in r.text.splitlines():
        if line.startswith("data: {"):
            for c in json.loads(line[6:])["choices"]:
                texts[c["index"]] += c["text"]
    assert texts == [c["text"] for c in out["choices"][:2]]


def test_json_constraints_are_honoured(env) -> None:
    for body in ({"response_format": {"type": "json_schema", "json_schema": {"name": "thing", "schema": SCHEMA}}},
                 {"guided_json": SCHEMA}, {"guided_json": json.dumps(SCHEMA)}):
        for path, extra in ((C, {"prompt": PROMPT}), (CHAT, {"messages": [{"role": "user", "content": "hi"}]})):
            r = post(env, path, {"model": MODEL, **extra, **SAMPLED, "max_tokens": 40, "ignore_eos": False, **body})
            assert r.status_code == 200, r.text
            choice = r.json()["choices"][0]
            text = choice["text"] if path == C else choice["message"]["content"]
            value = json.loads(text)
            assert value["color"] in ("red", "green", "blue") and 0 <= value["size"] <= 99
            assert choice["finish_reason"] == "stop"
    plain = completion(env, max_tokens=40)["choices"][0]["text"]
    with pytest.raises(ValueError):
        json.loads(plain)
    obj = completion(env, response_format={"type": "json_object"}, max_tokens=40)["choices"][0]["text"]
    assert obj.startswith("{") and obj == reference(env, max_tokens=40, json_schema={"type": "object"})[0].text
    assert completion(env, response_format={"type": "text"})["choices"][0]["text"] == reference(env)[0].text


def test_tool_choice(env) -> None:
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "weather?"}], "max_tokens": 40,
            "temperature": 0}
    named = post(env, CHAT, {**chat, "tools": [WEATHER, TIME],
                             "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}).json()
    call = named["choices"][0]["message"]["tool_calls"][0]
    assert call["type"] == "function" and call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"])["city"] in ("Paris", "Rome")
    assert named["choices"][0]["message"]["content"] is None
    required = post(env, CHAT, {**chat, "tools": [WEATHER, TIME], "tool_choice": "required",
                                "parallel_tool_calls": False}).json()
    calls = required["choices"][0]["message"]["tool_calls"]
    assert len(calls) == 1 and calls[0]["function"]["name"] in ("get_weather", "get_time")
    assert required["choices"][0]["finish_reason"] == "tool_calls"
    none = post(env, CHAT, {**chat, "tools": [WEATHER], "tool_choice": "none"}).json()
    assert none["choices"][0]["message"]["content"] == post(env, CHAT, chat).json()["choices"][0]["message"]["content"]
    assert named["usage"]["prompt_tokens"] > none["usage"]["prompt_tokens"]  # forced: the model is shown the tools
    # streamed: the named call's argument deltas add up to the same JSON
    r = env["client"].post(CHAT, json={**chat, "stream": True, "tools": [WEATHER],
                                       "tool_choice": {"type": "function", "function": {"name": "get_weather"}}})
    args = ""
    for line in r.text.splitlines():
        if line.startswith("data: {"):
            for c in json.loads(line[6:])["choices"]:
                for tc in c["delta"].get("tool_calls") or []:
                    args += tc["function"].get("arguments", "")
    assert json.loads(args)["city"] in ("Paris", "Rome")
    refused(post(env, CHAT, {**chat, "tools": [WEATHER]}), "tool_choice")  # "auto" needs a tool parser
    refused(post(env, CHAT, {**chat, "tools": [WEATHER], "tool_choice": "auto"}), "tool_choice")
    refused(post(env, CHAT, {**chat, "tool_choice": "required"}), "tool_choice")
    refused(post(env, CHAT, {**chat, "tools": [WEATHER],
                             "tool_choice": {"type": "function", "function": {"name": "nope"}}}), "tool_choice")
    refused(post(env, CHAT, {**chat, "tools": [WEATHER], "tool_choice": "required",
                             "response_format": {"type": "json_object"}}), "response_format")


# --- refused by name ---------------------------------------------------------------------------------
# A value for every declared-but-unimplemented parameter that would mean something.
NON_NEUTRAL = {
    "use_beam_search": True, "length_penalty": 0.5, "include_stop_str_in_output": True, "skip_special_tokens": False,
    "spaces_between_special_tokens": False, "truncate_prompt_tokens": 5, "prompt_logprobs": 1, "bad_words": ["the"],
    "guided_regex": "a+", "guided_choice": ["a", "b"], "guided_grammar": "root ::= 'a'",
    "guided_decoding_backend": "xgrammar", "guided_whitespace_pattern": " ", "structured_outputs": {"regex": "a"},
    "logits_processors": ["x"], "priority": 3, "request_id": "abc", "return_tokens_as_token_ids": True,
    "return_token_ids": True, "cache_salt": "s", "kv_transfer_params": {"a": 1}, "vllm_xargs": {"a": 1},
    "suffix": "The end.", "add_special_tokens": None, "prompt_embeds": "AAAA", "store": True, "service_tier": "flex",
    "modalities": ["text", "audio"], "audio": {"voice": "alloy", "format": "wav"}, "prediction": {"type": "content"},
    "reasoning_effort": "high", "verbosity": "low", "web_search_options": {}, "functions": [{"name": "f"}],
    "function_call": "auto", "echo": True, "continue_final_message": True, "documents": [{"text": "x"}],
    "chat_template": "{{ messages }}", "chat_template_kwargs": {"a": 1}, "mm_processor_kwargs": {"a": 1},
    "stream_options.continuous_usage_stats": True,
}
# Honoured (by the route or the engine) or labels that change no output.
HONOURED = {"model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
            "min_p", "seed", "stop", "stop_token_ids", "n", "best_of", "presence_penalty", "frequency_penalty",
            "repetition_penalty", "min_tokens", "logit_bias", "allowed_token_ids", "ignore_eos", "response_format",
            "guided_json", "stream", "stream_options", "echo", "logprobs", "top_logprobs", "tools", "tool_choice",
            "parallel_tool_calls", "add_generation_prompt"}
LABELS = {"user", "safety_identifier", "prompt_cache_key", "metadata"}


@pytest.mark.parametrize("model", [CompletionRequest, ChatCompletionRequest])
def test_every_declared_field_is_honoured_or_refused(model) -> None:
    neutral = {k for k in model.NEUTRAL_ONLY if "." not in k}
    for name in model.model_fields:  # a new field must be classified here (and honoured or refused)
        assert name in HONOURED | LABELS | neutral, name
    assert set(model.NEUTRAL_ONLY) <= set(NON_NEUTRAL)


def test_unimplemented_parameters_are_refused_by_name(env) -> None:
    for path, model, base in ((C, CompletionRequest, {"prompt": PROMPT}),
                              (CHAT, ChatCompletionRequest, {"messages": [{"role": "user", "content": "hi"}]})):
        for name in model.NEUTRAL_ONLY:
            value = NON_NEUTRAL[name]
            if name == "add_special_tokens":
                value = path == CHAT  # the other route's default
            body = {"model": MODEL, **base, "max_tokens": 2}
            if "." in name:
                parent, child = name.split(".")
                body.update({"stream": True, parent: {child: value}})
            else:
                body[name] = value
            refused(post(env, path, body), name)
            if "." not in name:  # the neutral value is accepted
                body[name] = model.NEUTRAL_ONLY[name][0] if name != "add_special_tokens" else path == C
                assert post(env, path, body).status_code == 200, (path, name)


def test_bad_values_are_refused_by_name(env) -> None:
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    comp = {"model": MODEL, "prompt": PROMPT, "max_tokens": 2}
    vocab = env["ref"].vocab_size
    cases = [
        (C, {**comp, "frobnicate": 1}, "frobnicate"),
        (CHAT, {**chat, "messages": [{"role": "user", "content": "hi", "mood": "x"}]}, "messages.0.mood"),
        (CHAT, {**chat, "response_format": {"type": "json_object", "strict": True}}, "response_format.strict"),
        (CHAT, {**chat, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]}, "messages.0.content.0.type"),
        (CHAT, {**chat, "messages": [{"role": "user", "content": [
            {"type": "text", "text": "hi", "image_url": {"url": "http://x/y.png"}}]}]}, "messages.0.content.0.image_url"),
        (CHAT, {**chat, "messages": [{"role": "assistant", "content": "", "refusal": "no"}]}, "messages.0.refusal"),
        (CHAT, {**chat, "response_format": {"type": "xml"}}, "response_format.type"),
        (CHAT, {**chat, "response_format": {"type": "json_schema"}}, "response_format.json_schema"),
        (CHAT, {**chat, "response_format": {"type": "json_schema", "json_schema": {
            "name": "x", "schema": {"not": {"type": "string"}}}}}, "response_format"),
        (C, {**comp, "guided_json": "{not json"}, "guided_json"),
        (C, {**comp, "guided_json": {"type": "object"}, "response_format": {"type": "json_object"}}, "guided_json"),
        (CHAT, {**chat, "top_logprobs": 3}, "top_logprobs"),
        (C, {**comp, "stream_options": {"include_usage": True}}, "stream_options"),
        (C, {**comp, "n": 3, "best_of": 2}, "best_of"),
        (C, {**comp, "n": 1, "best_of": 3, "stream": True}, "best_of"),
        (C, {**comp, "n": 100, "prompt": [PROMPT] * 3}, "n"),
        (C, {**comp, "logit_bias": {"abc": 1}}, "logit_bias"),
        (C, {**comp, "logit_bias": {"5": 200}}, "logit_bias"),
        (C, {**comp, "logit_bias": {str(vocab): 1}}, "logit_bias"),
        (C, {**comp, "allowed_token_ids": [vocab]}, "allowed_token_ids"),
        (C, {**comp, "allowed_token_ids": []}, "allowed_token_ids"),
        (C, {**comp, "stop_token_ids": [vocab]}, "stop_token_ids"),
        (C, {**comp, "min_tokens": 5}, "min_tokens"),  # more than max_tokens
        (C, {**comp, "temperature": 3}, "temperature"),
        (C, {**comp, "presence_penalty": 3}, "presence_penalty"),
        (C, {**comp, "frequency_penalty": -3}, "frequency_penalty"),
        (C, {**comp, "repetition_penalty": 0}, "repetition_penalty"),
        (C, {**comp, "min_p": 2}, "min_p"),
    ]
    for path, body, param in cases:
        refused(post(env, path, body), param)


# --- no client-caused 5xx ----------------------------------------------------------------------------
def test_hostile_bodies_get_400(env) -> None:
    comp = {"model": MODEL, "prompt": PROMPT, "max_tokens": 2}
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    surrogate = [
        (C, {**comp, "prompt": "\ud800"}, "prompt"),
        (C, {**comp, "prompt": ["ok", "a\udfffb"]}, "prompt.1"),
        (C, {**comp, "prompt": "\ud800", "stream": True}, "prompt"),
        (CHAT, {**chat, "messages": [{"role": "user", "content": "x\ud800"}]}, "messages.0.content"),
        (CHAT, {**chat, "messages": [{"role": "user", "content": "\ud800"}], "stream": True}, "messages.0.content"),
        (CHAT, {**chat, "messages": [{"role": "user", "content": [{"type": "text", "text": "\udc00"}]}]},
         "messages.0.content.0.text"),
        (C, {**comp, "stop": ["\ud800"]}, "stop.0"),
    ]
    for path, body, param in surrogate:
        refused(post_raw(env, path, json.dumps(body).encode()), param)  # ensure_ascii keeps "\ud800" escaped
    deep = b"[" * 2000 + b"]" * 2000
    for raw in (b'{"model": "tiny", "prompt": ' + deep + b"}",
                b'{"model": "tiny", "messages": [{"role": "user", "content": ' + deep + b"}]}",
                b'{"model": "tiny", "prompt": "x", "guided_json": {"a": ' + b'{"b": ' * 2000 + b"1" + b"}" * 2001 + b"}"):
        r = post_raw(env, C if b"prompt" in raw else CHAT, raw)
        assert r.status_code == 400 and "nested" in r.json()["error"]["message"]
    huge = [("seed", 1e23), ("seed", 2**64), ("seed", -(2**63) - 1), ("top_k", 10**30), ("max_tokens", 10**30),
            ("min_tokens", 10**30), ("n", 10**30), ("best_of", 10**30), ("logprobs", 10**30), ("temperature", 1e308),
            ("logit_bias", {"9" * 40: 1}), ("allowed_token_ids", [10**30]), ("stop_token_ids", [10**30]),
            ("prompt", [10**30]), ("prompt", [[-1]])]
    for name, value in huge:
        r = post(env, C, {**comp, name: value})
        assert r.status_code == 400 and r.json()["error"]["param"].split(".")[0] == name, (name, r.text)
    for raw in (b'{"model": "tiny", "prompt": "x", "temperature": NaN}',
                b'{"model": "tiny", "prompt": "x", "top_p": Infinity}', b"\xff\xfe{}", b"[]", b""):
        assert post_raw(env, C, raw).status_code == 400


# Lone surrogates and control characters come often (a third of the characters each), or plain text.
_CHAR = st.one_of(st.characters(codec=None, categories=("Cs",)), st.characters(codec=None, categories=("Cc",)),
                  st.characters(codec=None))
_TEXT = st.one_of(st.lists(_CHAR, max_size=12).map("".join), st.text(max_size=12))
_NUMBER = st.one_of(st.integers(-(2**80), 2**80), st.floats(allow_nan=True, allow_infinity=True),
                    st.sampled_from([0, -1, 2**63, 2**64, 1e23, -1e23]))
_FIELDS = ["prompt", "stop", "user", "seed", "max_tokens", "temperature", "top_p", "top_k", "n", "best_of",
           "logprobs", "presence_penalty", "frequency_penalty", "repetition_penalty", "min_p", "min_tokens",
           "logit_bias", "allowed_token_ids", "stop_token_ids", "model"]


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(field=st.sampled_from(_FIELDS), text=_TEXT, number=_NUMBER, chat=st.booleans(), stream=st.booleans())
def test_fuzzed_strings_and_numbers_never_get_a_5xx(env, field: str, text: str, number, chat: bool,
                                                    stream: bool) -> None:
    body: dict = {"model": MODEL, "max_tokens": 2, "stream": stream}
    if chat:
        body["messages"] = [{"role": "user", "content": text}]
    else:
        body["prompt"] = text or "x"
    value = {"prompt": text, "stop": [text], "user": text, "model": text, "logit_bias": {text: number},
             "allowed_token_ids": [number], "stop_token_ids": [number]}.get(field, number)
    if not (chat and field == "prompt"):
        body[field] = value
    raw = json.dumps(body, allow_nan=True).encode()  # lone surrogates stay escaped, NaN stays NaN
    r = post_raw(env, CHAT if chat else C, raw)
    if r.status_code == 200 and stream:
        assert '"internal_server_error"' not in r.text
