"""Helpers the test modules share, in one place: the read-only test data outside the repository, an ASGI
app served in a thread, the `optcli` console script run in a subprocess, and the TinyStories prompts and
transformers' greedy reference the engine tests compare against, and a cycle finder for import graphs.

Importable as `helpers` because `tests/` is on `sys.path` (pyproject's `pythonpath`); fixtures stay in
`conftest.py`. A test module imports this, never another test module or `conftest`.
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
OPTCLI = str(Path(sys.executable).parent / "optcli")  # the console script of the interpreter running the tests


def missing(msg: str) -> None:
    """Something a test needs is not here: skip locally, but fail under CI=true (CI installs everything)."""
    if os.environ.get("CI") == "true":
        pytest.fail(msg)
    pytest.skip(msg)


def shared_data(name: str) -> Path:
    """Path of a file in ../shared/data; skip when missing locally, but fail under CI=true."""
    path = SHARED_DATA / name
    if not path.is_file():
        missing(f"test data {path} is missing")
    return path


def optcli(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None,
           timeout: float = 600) -> subprocess.CompletedProcess:
    """`optcli ARGS` in a subprocess, output captured as text; `env` adds to (or overrides) this environment."""
    return subprocess.run([OPTCLI, *args], capture_output=True, text=True, cwd=cwd, timeout=timeout,
                          env=None if env is None else {**os.environ, **env})


@contextlib.contextmanager
def serve_in_thread(app) -> Iterator[str]:
    """An ASGI app on a free 127.0.0.1 port in a daemon thread (uvicorn); yields its base URL."""
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "test server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def story_prompts(tokenizer, n: int = 32, seed: int = 0) -> list[list[int]]:
    """n prompts of 1..80 tokens cut from TinyStories text."""
    text = shared_data("tinystories_train_sample.txt").read_text(encoding="utf-8")
    rng = random.Random(seed)
    prompts = []
    for i in range(n):
        start = rng.randrange(0, len(text) - 1000)
        length = 1 + (i * 7919) % 80
        prompts.append(tokenizer(text[start : start + 1000]).input_ids[:length])
    return prompts


def hf_greedy(model, prompts: list[list[int]], max_new: int, eos: int | None) -> list[list[int]]:
    """transformers' greedy continuation of each prompt, one at a time (the reference the engine matches)."""
    import torch

    outs = []
    for p in prompts:
        ids = model.generate(torch.tensor([p]), max_new_tokens=max_new, do_sample=False, eos_token_id=eos,
                             pad_token_id=0, attention_mask=torch.ones(1, len(p), dtype=torch.long))
        outs.append(ids[0, len(p):].tolist())
    return outs


def find_cycle(graph: dict[str, list[str]]) -> list[str] | None:
    """One import circle in `graph` (module -> modules it imports) as a path back to its start, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in graph.get(node, ()):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)):
            return cycle
    return None
