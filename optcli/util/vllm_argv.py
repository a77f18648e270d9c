"""argv for `vllm serve`: our options mapped onto vLLM's flags. Shared by `serve --engine vllm` (which
execs it) and `profile --engine vllm` (which starts it as a child and measures it), so it lives below both."""

from __future__ import annotations

import os
import shutil

from optcli.errors import UsageError


def vllm_executable() -> str:
    exe = shutil.which("vllm")
    if exe is None:
        raise UsageError("--engine vllm: vLLM is not installed (no `vllm` on PATH); `pip install vllm` on a GPU "
                         "machine, or use --engine builtin")
    return exe


def vllm_command(
    model_path: str,
    host: str,
    port: int,
    served_model_name: str | None = None,
    api_key: str | None = None,
    max_num_seqs: int | None = None,
    max_model_len: int | None = None,
    gpu_memory_utilization: float | None = None,
    tensor_parallel_size: int = 1,
    pipeline_parallel_size: int = 1,
    enforce_eager: bool = False,
    executable: str | None = None,
    dtype: str = "auto",
    kv_cache_dtype: str = "auto",
) -> list[str]:
    """argv for `vllm serve` with our options mapped onto its flags."""
    exe = executable or vllm_executable()
    argv = [exe, "serve", model_path, "--host", host, "--port", str(port),
            "--tensor-parallel-size", str(tensor_parallel_size), "--pipeline-parallel-size", str(pipeline_parallel_size)]
    optional = {
        "--served-model-name": served_model_name,
        "--max-num-seqs": max_num_seqs,
        "--max-model-len": max_model_len,
        "--gpu-memory-utilization": gpu_memory_utilization,
        "--dtype": None if dtype == "auto" else dtype,  # vLLM's own auto rule is ours on CUDA
        "--kv-cache-dtype": None if kv_cache_dtype == "auto" else kv_cache_dtype,  # the same names as vLLM's
    }
    for flag, value in optional.items():
        if value is not None:
            argv += [flag, str(value)]
    if enforce_eager:
        argv.append("--enforce-eager")
    if api_key:  # through the environment, so the key does not show in `ps`
        os.environ["VLLM_API_KEY"] = api_key
    return argv
