"""Facts about the running process that several commands record: library versions, the device a
command runs on, and peak memory. torch is imported inside the functions: `optcli roi` and
`optcli --help` never need it."""

from __future__ import annotations

import platform
import resource
import sys
from importlib import metadata

from optcli import __version__
from optcli.errors import UsageError


def library_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"optcli": __version__, "python": platform.python_version()}
    for dist in ("torch", "transformers", "llmcompressor", "compressed-tensors", "bitsandbytes", "triton"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    return versions


def pick_device(device: str) -> str:
    import torch

    if device not in ("auto", "cpu", "cuda"):
        raise UsageError(f"--device must be auto, cpu or cuda (got '{device}')")
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available on this machine")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def peak_memory_bytes(device: str) -> dict[str, int | None]:
    import torch

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    gpu = torch.cuda.max_memory_allocated() if device == "cuda" else None
    return {"host_peak_rss_bytes": rss, "gpu_peak_allocated_bytes": gpu}
