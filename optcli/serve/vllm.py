"""`optcli serve --engine vllm`: hand the same artifact to vLLM's OpenAI server for deployments that
outgrow one machine. We only map our options onto vLLM's flags (`optcli.util.vllm_argv`) and exec it, so
signals, logs and exit codes are vLLM's own."""

from __future__ import annotations

import os

from optcli.util.vllm_argv import vllm_command, vllm_executable

__all__ = ["exec_vllm", "vllm_command", "vllm_executable"]


def exec_vllm(argv: list[str]) -> None:
    """Replace this process with vLLM's server."""
    os.execv(argv[0], argv)
