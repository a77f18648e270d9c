"""`profile --dataset`: users' own prompts (text, OpenAI chat, ShareGPT rows, per-row output lengths)
through the engine and against `optcli serve`, and `--output-len A:B`; bad files are exit 2 naming the line."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from helpers import serve_in_thread
from typer.testing import CliRunner

from optcli.bench.dataset import load_dataset
from optcli.bench.workload import Workload, parse_output_len
from optcli.cli import app
from optcli.engine.async_engine import AsyncEngine
from optcli.engine.engine import Engine
from optcli.errors import UsageError
from optcli.serve.app import create_app

ROWS = [
    {"prompt": "Once upon a time, there was a little dog.", "output_tokens": 5},
    {"messages": [{"role": "system", "content": "Tell stories."}, {"role": "user", "content": "A cat?"}]},
    {"conversations": [{"from": "human", "value": "Tell me about Lily."},
                       {"from": "gpt", "value": "Lily was a girl who loved to play in the park with her friends."}]},
]


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    return path


def test_rows_become_requests_with_their_own_lengths(dataset: Path, stories_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(stories_dir)
    rows = load_dataset(dataset)
    workload = Workload(requests=5, output_len=(3, 9), dataset=rows)
    requests = workload.sample((3, 500), encoder=tok)
    assert len(requests) == 5 and all(isinstance(p, list) for p, _ in requests)  # token ids for the engine
    assert requests[0][1] == 5  # output_tokens
    assert 3 <= requests[1][1] <= 9  # the --output-len range for a row without one
    reply = len(tok(ROWS[2]["conversations"][1]["value"], add_special_tokens=False).input_ids)
    assert requests[2][1] == reply  # ShareGPT: the reply's length
    assert requests[3][0] == requests[0][0]  # rows cycle
    texts = workload.sample((3, 500), tokenizer=tok)  # for a server: text
    assert texts[0][0] == ROWS[0]["prompt"] and "user: A cat?" in texts[1][0]  # no chat template: a transcript
    assert parse_output_len("16") == 16 and parse_output_len("8:32") == (8, 32)
    lengths = {Workload(requests=200, output_len=(2, 4))._output_len(random.Random(i)) for i in range(50)}
    assert lengths == {2, 3, 4}


@pytest.mark.parametrize(("text", "needle"), [
    ('{"prompt": 1}\n', "line 1"),
    ('{"prompt": "a"}\nnot json\n', "line 2"),
    ('{"prompt": "a", "output_tokens": 0}\n', "output_tokens"),
    ('{"conversations": [{"from": "gpt", "value": "hi"}]}\n', "before the first reply"),
    ("", "no rows"),
])
def test_bad_datasets_are_one_line_usage_errors(tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(UsageError, match=needle):
        load_dataset(path)
    for value in ("0", "5:2", "x"):
        with pytest.raises(UsageError, match="--output-len"):
            parse_output_len(value)


def test_a_dataset_profiles_in_process_and_against_optcli_serve(dataset: Path, stories_dir: Path) -> None:
    runner = CliRunner()
    args = ["--dataset", str(dataset), "--requests", "6", "--output-len", "2:4", "--concurrency", "2", "--json"]
    result = runner.invoke(app, ["profile", str(stories_dir), *args])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["workload"]["dataset"] == {"path": str(dataset), "rows": 3} and report["workload"]["output_len"] == [2, 4]
    assert report["throughput"]["output_tok_s"] > 0 and report["throughput"]["failed_requests"] == 0
    aengine = AsyncEngine(Engine(str(stories_dir), device="cpu"))
    served = create_app(aengine, "stories")
    routes: list[str] = []

    @served.middleware("http")
    async def record(request, call_next):
        routes.append(request.url.path)
        return await call_next(request)

    try:
        with serve_in_thread(served) as url:
            result = runner.invoke(app, ["profile", "stories", "--endpoint", url, "--tokenizer", str(stories_dir), *args])
    finally:
        aengine.shutdown(10)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["throughput"]["failed_requests"] == 0 and report["throughput"]["output_tok_s"] > 0
    assert report["workload"]["dataset"]["rows"] == 3
    # text rows as completions; the chat and ShareGPT rows as chat completions (the server's own template)
    assert routes.count("/v1/completions") == 2 and routes.count("/v1/chat/completions") == 4


def test_output_lengths_drawn_from_a_dataset(dataset: Path, stories_dir: Path, tmp_path: Path) -> None:
    """--output-len @FILE: each request's length is one of the file's (output_tokens, a ShareGPT reply's)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(stories_dir)
    lengths = parse_output_len(f"@{dataset}")
    reply = len(tok(ROWS[2]["conversations"][1]["value"], add_special_tokens=False).input_ids)
    drawn = {n for _, n in Workload(requests=40, output_len=lengths).sample((3, 500), encoder=tok)}
    assert drawn == {5, reply}  # the chat row has neither: it is not a length
    rows_path = tmp_path / "requests.jsonl"  # not rows.jsonl: that is the dataset, which --export must not replace
    result = CliRunner().invoke(app, ["profile", str(stories_dir), "--requests", "6", "--output-len", f"@{dataset}",
                                      "--concurrency", "2", "--export", str(rows_path), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["workload"]["output_len"] == f"@{dataset}"
    assert {json.loads(line)["output_tokens"] for line in rows_path.read_text().splitlines()} <= {5, reply}
    bare = tmp_path / "bare.jsonl"
    bare.write_text('{"prompt": "no length here"}\n')
    with pytest.raises(UsageError, match="no row has output_tokens"):
        parse_output_len(f"@{bare}")
