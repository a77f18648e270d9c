"""The one C-kernel builder both CPU libraries use (`engine/kernels/cpu_build.py`): it compiles, declares
each function's signature, keys the cached library by source and flags, and turns a failed build into None."""

from __future__ import annotations

import ctypes
import logging

import pytest

from optcli.engine.kernels import cpu_amx, cpu_lowbit
from optcli.engine.kernels.cpu_build import I64, CLibrary, compiler

pytestmark = pytest.mark.skipif(compiler() is None, reason="no C compiler here")


def _library(tmp_path, body: str, flags=("-O1", "-fPIC", "-shared")) -> CLibrary:
    (tmp_path / "k.h").write_text("#include <stdint.h>\n")
    (tmp_path / "k.c").write_text('#include "k.h"\n' + body)
    return CLibrary(name="test", sources=(tmp_path / "k.c",), header=tmp_path / "k.h", flags=flags,
                    functions={"twice": ([I64], I64)})


def test_builds_declares_and_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("OPTCLI_CACHE", str(tmp_path / "cache"))
    lib = _library(tmp_path, "int64_t twice(int64_t x) { return 2 * x; }\n").build("a test library")
    assert lib is not None and lib.twice(1 << 40) == 1 << 41  # argtypes/restype declared: no 32-bit truncation
    assert lib.twice.restype is I64
    other = _library(tmp_path, "int64_t twice(int64_t x) { return x + x; }\n", flags=("-O2", "-fPIC", "-shared"))
    assert other.build("a test library").twice(21) == 42
    built = sorted(p.name for p in (tmp_path / "cache" / "cpu-kernels").iterdir())
    assert len(built) == 2 and all(n.startswith("test-") and n.endswith(".so") for n in built)  # one per key


def test_a_failed_build_is_none_and_logged(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("OPTCLI_CACHE", str(tmp_path / "cache"))
    with caplog.at_level(logging.WARNING):
        assert _library(tmp_path, "this is not C\n").build("a broken library") is None
    assert "a broken library did not build" in caplog.text


def test_both_kernel_libraries_use_it():
    assert isinstance(cpu_lowbit.LIBRARY, CLibrary) and isinstance(cpu_amx.LIBRARY, CLibrary)
    assert cpu_lowbit.LIBRARY.functions["lowbit_read_probe"][1] is I64
    assert cpu_amx.LIBRARY.functions["amx_init"][1] is ctypes.c_int
    assert any(p.name == "cpu_vnni.c" for p in cpu_amx.LIBRARY.sources)  # the VNNI kernels are the AMX build's
