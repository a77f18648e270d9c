"""Test-session setup (threads, Triton interpreter, cache) and the shared fixtures; helper functions live in
`helpers.py`."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import shared_data

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
# profile's timed window (`--min-time`, 0.5 s) repeats every short run until half a second has passed: the
# statistics' precision, not what the tests check, and it would add ~15 s to each of the ~50 profile runs of the
# suite. tests/bench/test_repeats.py checks the window itself, with its own values.
os.environ.setdefault("OPTCLI_MIN_TIME", "0")
os.environ.setdefault("OPTCLI_CACHE", str(Path(__file__).resolve().parents[1] / ".pytest_cache" / "optcli"))


@pytest.fixture(scope="session")
def stories_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """stories260K converted to a Hugging Face directory once per test session."""
    from optcli.checkpoints.llama2c import convert_llama2c

    out = tmp_path_factory.mktemp("stories") / "stories260K"
    return convert_llama2c(shared_data("stories260K.bin"), shared_data("tok512.bin"), out)
