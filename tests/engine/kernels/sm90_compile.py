"""Lower Triton kernels through the real compiler to an sm_90 cubin, without a GPU.

The interpreter accepts code the compiler rejects (and vice versa), so kernel tests also compile.
A test passes the body of a script that calls `build(module, kernel, pointer/float types, constexprs)`
for each kernel; it runs in a subprocess with the interpreter off, and needs only the ptxas that
triton bundles.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PRELUDE = """
import importlib
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler.compiler import ASTSource

def build(module, kernel, types, consts):
    fn = getattr(importlib.import_module("optcli.engine.kernels." + module), kernel)
    sig = {a: "constexpr" if a in consts else types.get(a, "i32") for a in fn.arg_names}
    triton.compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", 90, 32))

bf = "*bf16"
"""


def compile_for_sm90(body: str, **env: str) -> None:
    """Run PRELUDE + body with TRITON_INTERPRET=0 (plus `env`); fail with the compiler's stderr."""
    nvidia = pytest.importorskip("triton.backends.nvidia")
    if not (Path(nvidia.__file__).parent / "bin" / "ptxas").exists() and shutil.which("ptxas") is None:
        pytest.skip("no ptxas to finish the compile")
    proc = subprocess.run([sys.executable, "-c", PRELUDE + body], env={**os.environ, "TRITON_INTERPRET": "0", **env},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
