"""`optcli serve` plumbing that needs no server: --engine vllm argument mapping and its errors."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from helpers import OPTCLI


def test_engine_vllm_maps_options_onto_vllm_serve(tmp_path: Path) -> None:
    record = tmp_path / "argv.json"
    fake = tmp_path / "bin" / "vllm"
    fake.parent.mkdir()
    fake.write_text(
        "#!/usr/bin/env python3\nimport json, os, sys\n"
        f"json.dump({{'argv': sys.argv[1:], 'key': os.environ.get('VLLM_API_KEY')}}, open({str(record)!r}, 'w'))\n"
    )
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{fake.parent}:{os.environ['PATH']}"}
    result = subprocess.run(
        [OPTCLI, "serve", "builtin:tiny-llama", "--engine", "vllm", "--port", "9123", "--max-num-seqs", "32",
         "--max-model-len", "1024", "--gpu-memory-utilization", "0.8", "--tensor-parallel-size", "2",
         "--pipeline-parallel-size", "2", "--api-key", "s3cret", "--served-model-name", "tiny"],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    seen = json.loads(record.read_text())
    argv = seen["argv"]
    assert argv[0] == "serve" and Path(argv[1]).is_dir() and (Path(argv[1]) / "config.json").is_file()
    pairs = dict(zip(argv[2::2], argv[3::2], strict=False))
    assert pairs == {"--host": "127.0.0.1", "--port": "9123", "--tensor-parallel-size": "2",
                     "--pipeline-parallel-size": "2", "--served-model-name": "tiny", "--max-num-seqs": "32",
                     "--max-model-len": "1024", "--gpu-memory-utilization": "0.8"}
    assert seen["key"] == "s3cret" and "s3cret" not in argv  # the key travels in the environment


def test_engine_vllm_missing_exits_2(tmp_path: Path) -> None:
    env = {**os.environ, "PATH": str(tmp_path)}  # no vllm anywhere
    result = subprocess.run([OPTCLI, "serve", "builtin:tiny-llama", "--engine", "vllm"], capture_output=True,
                            text=True, env=env, timeout=120)
    assert result.returncode == 2
    assert "vLLM is not installed" in result.stderr and "Traceback" not in result.stderr


def test_bad_engine_and_parallel_builtin_exit_2() -> None:
    for args in (["--engine", "tgi"], ["--tensor-parallel-size", "2"]):
        result = subprocess.run([OPTCLI, "serve", "builtin:tiny-llama", *args], capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 2, (args, result.stderr)


def test_serve_starts_answers_and_exits_0_on_sigterm_under_load() -> None:
    import signal
    import socket
    import threading
    import time

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([OPTCLI, "serve", "builtin:tiny-llama", "--port", str(port), "--max-num-seqs", "4"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        else:
            raise AssertionError("server did not come up")
        body = {"model": "builtin:tiny-llama", "prompt": "Once upon a time", "max_tokens": 64, "ignore_eos": True,
                "stream": True, "temperature": 0}
        statuses: list[int] = []

        def client() -> None:
            try:
                with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=60) as response:
                    statuses.append(response.status_code)
                    for _ in response.iter_lines():
                        pass
            except httpx.HTTPError:
                statuses.append(-1)  # cut off by the shutdown: allowed

        threads = [threading.Thread(target=client) for _ in range(8)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=90)
        for t in threads:
            t.join(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    stderr = proc.stderr.read()
    assert code == 0, stderr
    assert "Traceback" not in stderr
    assert all(s in (200, 429, -1) for s in statuses) and 200 in statuses
    assert f"listening on http://127.0.0.1:{port}" in proc.stdout.read()  # the URL it serves, once it does


def test_empty_api_key_exits_2_in_one_line() -> None:
    for key in ("", "   "):
        result = subprocess.run([OPTCLI, "serve", "builtin:tiny-llama", "--api-key", key], capture_output=True,
                                text=True, timeout=120)
        assert result.returncode == 2, result.stderr
        assert "--api-key" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_port_in_use_exits_2_naming_it_before_loading_the_model() -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run([OPTCLI, "serve", "builtin:tiny-llama", "--port", str(port)], capture_output=True,
                                text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert f"127.0.0.1:{port}" in result.stderr and "Traceback" not in result.stderr
    assert "serving" not in result.stderr  # the engine never started
