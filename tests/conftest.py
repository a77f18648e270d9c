"""Shared test helpers: locate the read-only test data that lives outside the repository."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def shared_data(name: str) -> Path:
    """Path of a file in ../shared/data; skip when missing locally, but fail under CI=true."""
    path = SHARED_DATA / name
    if not path.is_file():
        msg = f"test data {path} is missing"
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    return path


# Under pytest-xdist (`-n auto`, pyproject.toml) each worker has one core: one torch thread, and the CLI
# processes a test starts inherit OMP_NUM_THREADS=1, so workers never fight over cores (OpenMP's
# barriers stall when another process holds a core the team is waiting on).
XDIST_WORKER = bool(os.environ.get("PYTEST_XDIST_WORKER"))
if XDIST_WORKER:
    os.environ["OMP_NUM_THREADS"] = "1"

# Without a GPU, Triton kernels run in Triton's interpreter; it must be on before any kernel is defined.
try:
    import torch

    if XDIST_WORKER:
        torch.set_num_threads(1)
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:  # pragma: no cover
    pass

# Builtin models are materialized into a cache; keep the tests' cache out of the user's home.
os.environ.setdefault("OPTCLI_CACHE", str(Path(__file__).resolve().parents[1] / ".pytest_cache" / "optcli"))


@pytest.fixture(scope="session")
def stories_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """stories260K converted to a Hugging Face directory once per test session."""
    from optcli.checkpoints.llama2c import convert_llama2c

    out = tmp_path_factory.mktemp("stories") / "stories260K"
    return convert_llama2c(shared_data("stories260K.bin"), shared_data("tok512.bin"), out)


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
