"""argv for `vllm serve`: our options mapped onto vLLM's flags. `serve --engine vllm` execs it; `profile
--engine vllm` starts it as a child and measures it."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass

from optcli.config import EngineConfig
from optcli.errors import UsageError


@dataclass(frozen=True)
class VllmOptions:
    """What only vLLM has (the built-in engine runs on one device), and the context asked for by flag."""

    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    max_model_len: int | None = None  # None: vLLM's own (the model's context), not our engine's default
    ready_timeout_s: float = 1800.0  # loading a large model and capturing its graphs takes minutes

    def check(self) -> None:
        if self.tensor_parallel_size < 1 or self.pipeline_parallel_size < 1:
            raise UsageError("--tensor-parallel-size and --pipeline-parallel-size must be >= 1")

    @property
    def parallel(self) -> bool:
        return self.tensor_parallel_size > 1 or self.pipeline_parallel_size > 1


def vllm_executable() -> str:
    exe = shutil.which("vllm")
    if exe is None:
        raise UsageError("--engine vllm: vLLM is not installed (no `vllm` on PATH); `pip install vllm` on a GPU "
                         "machine, or use --engine builtin")
    return exe


def engine_flags(config: EngineConfig) -> list[str]:
    """Each `EngineConfig` option declared with a `vllm` flag: a true bool as the bare flag, a value unless it
    is None or "auto" (vLLM's own auto rule is ours on CUDA)."""
    argv: list[str] = []
    for f in type(config).cli_fields():
        flag, value = f.metadata.get("vllm"), getattr(config, f.name)
        if flag is None or value is None or value is False or value == "auto":
            continue
        argv += [flag] if value is True else [flag, str(value)]
    return argv


def vllm_command(model_path: str, host: str, port: int, config: EngineConfig, options: VllmOptions,
                 served_model_name: str | None = None, api_key: str | None = None,
                 executable: str | None = None) -> list[str]:
    """argv for `vllm serve` with our options mapped onto its flags; `api_key` goes through the environment
    (VLLM_API_KEY), so the key does not show in `ps`."""
    exe = executable or vllm_executable()
    argv = [exe, "serve", model_path, "--host", host, "--port", str(port),
            "--tensor-parallel-size", str(options.tensor_parallel_size),
            "--pipeline-parallel-size", str(options.pipeline_parallel_size)]
    if served_model_name is not None:
        argv += ["--served-model-name", served_model_name]
    if options.max_model_len is not None:
        argv += ["--max-model-len", str(options.max_model_len)]
    argv += engine_flags(config)
    if api_key:
        os.environ["VLLM_API_KEY"] = api_key
    return argv


def exec_vllm(argv: list[str]) -> None:
    """Replace this process with vLLM's server: signals, logs and exit codes are vLLM's own."""
    os.execv(argv[0], argv)
