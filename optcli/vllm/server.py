"""`profile --engine vllm`: the artifact (and then its source) served by `vllm serve` for the run, with the
flags `serve --engine vllm` maps, on a free loopback port; ready when `/health` answers, stopped after.

One server at a time, so a model that needs every GPU of the machine can be measured, then its source."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx

from optcli.config import EngineConfig
from optcli.vllm.argv import VllmOptions, vllm_command


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: str, lines: int = 8) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return " | ".join(line.strip() for line in fh.readlines()[-lines:] if line.strip())
    except OSError:
        return ""


@contextmanager
def vllm_server(model_path: str, served_name: str, config: EngineConfig, options: VllmOptions,
                step=lambda message: None) -> Iterator[str]:
    """Yields the base URL of a `vllm serve` of `model_path` under `served_name`; its output goes to a
    temporary log whose last lines are in the error when it exits before it is ready."""
    port = _free_port()
    argv = vllm_command(model_path, "127.0.0.1", port, config, options, served_model_name=served_name)
    log = tempfile.NamedTemporaryFile(prefix="optcli-vllm-", suffix=".log", delete=False)
    step(f"starting vllm serve {model_path} (tensor parallel {options.tensor_parallel_size}) on port {port}")
    # its own session: stopping it stops the workers it spawned too
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(proc, url, options.ready_timeout_s, log.name)
        yield url
    finally:
        _stop(proc)
        log.close()
        os.unlink(log.name)


def _wait_ready(proc: subprocess.Popen, url: str, timeout_s: float, log: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"vllm serve exited with code {proc.returncode} before it was ready: {_tail(log)}")
        try:
            if httpx.get(f"{url}/health", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass  # not listening yet
        time.sleep(0.5)
    raise RuntimeError(f"vllm serve was not ready within {timeout_s:.0f} s: {_tail(log)}")


def _stop(proc: subprocess.Popen, grace_s: float = 30.0) -> None:
    """SIGTERM to its process group (vLLM shuts its workers down), SIGKILL after the grace period."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass
