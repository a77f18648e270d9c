"""`profile --endpoint` against servers as they are: a base URL typed with or without /v1, servers that
take only text prompts, and servers that fail some or every request (never a silent report of nulls)."""

from __future__ import annotations

import asyncio
import json

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from helpers import serve_in_thread
from typer.testing import CliRunner

from optcli.bench.load_generator import api_base_url
from optcli.cli import app
from optcli.errors import UsageError

SMALL = ["--requests", "6", "--prompt-len", "8:16", "--output-len", "4", "--concurrency", "2", "--json"]


def _strict_app() -> FastAPI:
    """Only POST /v1/completions exists (so /v1/v1/... is a 404); the `model` field picks the behaviour:
    `text-only` rejects token-id prompts with 400 (as several OpenAI-compatible servers do),
    `down` fails every request with 503, `flaky` fails every other one with 500."""
    server = FastAPI()
    counter = {"n": 0}

    @server.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        counter["n"] += 1
        model, prompt, n = body["model"], body["prompt"], body["max_tokens"]
        if model == "text-only" and not isinstance(prompt, str):
            return JSONResponse({"error": {"message": "prompt must be a string", "type": "invalid_request_error"}},
                                status_code=400)
        if model == "down":
            return JSONResponse({"error": {"message": "model is loading"}}, status_code=503)
        if model == "flaky" and counter["n"] % 2 == 0:
            return JSONResponse({"error": {"message": "out of KV blocks"}}, status_code=500)
        prompt_tokens = len(prompt.split()) if isinstance(prompt, str) else len(prompt)

        async def events():
            for i in range(n):
                await asyncio.sleep(0.002)
                yield f"data: {json.dumps({'choices': [{'index': 0, 'text': f' w{i}', 'finish_reason': None}]})}\n\n"
            usage = {"prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens + n}
            yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return server


@pytest.fixture(scope="module")
def server_url():
    with serve_in_thread(_strict_app()) as url:
        yield url


def _profile(*args: str):
    return CliRunner().invoke(app, ["profile", *args, *SMALL])


@pytest.mark.parametrize("typed", ["http://h:8000", "http://h:8000/", "http://h:8000/v1", "http://h:8000/v1/",
                                   "http://h:8000/v1/completions"])
def test_the_base_url_is_taken_with_or_without_v1(typed: str) -> None:
    assert api_base_url(typed) == "http://h:8000/v1"


def test_a_base_url_under_a_path_prefix_keeps_it() -> None:
    assert api_base_url("https://gw.example/llm/v1") == "https://gw.example/llm/v1"
    with pytest.raises(UsageError, match="http"):
        api_base_url("127.0.0.1:8000")


@pytest.mark.parametrize("suffix", ["", "/v1", "/v1/"])
def test_profile_reaches_the_server_whatever_the_suffix(server_url: str, stories_dir, suffix: str) -> None:
    result = _profile("ok", "--endpoint", server_url + suffix, "--tokenizer", str(stories_dir))
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["throughput"]["failed_requests"] == 0
    assert report["throughput"]["output_tok_s"] > 0
    assert report["workload"]["prompt_format"] == "text"


def test_a_text_only_server_is_profiled_with_text_prompts(server_url: str, stories_dir) -> None:
    result = _profile("text-only", "--endpoint", server_url + "/v1", "--tokenizer", str(stories_dir))
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["throughput"]["failed_requests"] == 0
    assert report["throughput"]["total_tok_s"] > report["throughput"]["output_tok_s"]  # the server's prompt counts


def test_the_default_tokenizer_for_a_remote_model_is_the_builtin_one(server_url: str) -> None:
    result = _profile("text-only", "--endpoint", server_url)
    assert result.exit_code == 0, result.output
    assert "approximate" in json.loads(result.stdout)["workload"]["tokenizer"]


def test_token_prompts_to_a_text_only_server_fail_the_run_with_its_status(server_url: str) -> None:
    result = _profile("text-only", "--endpoint", server_url, "--prompt-format", "tokens")
    assert result.exit_code == 1
    assert "all 6 requests" in result.output and "HTTP 400: prompt must be a string" in result.output


def test_a_server_failing_every_request_exits_1_naming_the_first_error(server_url: str, stories_dir) -> None:
    result = _profile("down", "--endpoint", server_url + "/v1", "--tokenizer", str(stories_dir))
    assert result.exit_code == 1
    assert "HTTP 503: model is loading" in result.output
    assert "/v1/completions" in result.output and "/v1/v1" not in result.output


def test_some_failures_are_counted_and_explained(server_url: str, stories_dir, tmp_path) -> None:
    result = CliRunner().invoke(app, ["profile", "flaky", "--endpoint", server_url, "--tokenizer", str(stories_dir),
                                      *SMALL[:-1], "--out", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    failures = report["throughput"]["failures"]
    assert 0 < failures["failed"] < failures["total"] == 6
    assert failures["reasons"][0]["error"].endswith("HTTP 500: out of KV blocks")
    assert f"{failures['failed']} of 6 requests failed" in result.output
