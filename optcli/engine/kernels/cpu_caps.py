"""What this CPU can do, as flags: the one input, with a layer's shape and the batch size, of every CPU
path rule (the dtype in `engine/loading/placement.py`, each layer's kernel in `engine/quant/cpu_choice.py`).

Read from /proc/cpuinfo's flags (torch's `get_cpu_capability()` where there is no such file), never
measured: the same machine gives the same answer in every run, busy or not. `lowbit`, `vnni_kernels` and
`amx_kernels` say whether our own C kernels were built here (a compiler, and for AMX the kernel's grant of tile state);
they are read from the build each call, so a test that disables a build is seen. The flags themselves are `cpu_flags`'s.

Tests build `CpuCaps(...)` by hand to ask the rules what an AVX2-only, an AVX-512 VNNI or an AMX CPU
would run.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from optcli.engine.kernels.cpu_flags import cpu_flags  # re-exported: callers read the flags from here


@dataclass(frozen=True)
class CpuCaps:
    avx2: bool = False  # AVX2 + FMA + F16C: what our `cpu_lowbit.c` kernels need
    avx512: bool = False  # AVX-512 F/BW/VL
    avx512_bf16: bool = False  # bf16 dot products (vdpbf16ps): native bf16 GEMMs in oneDNN
    vnni: bool = False  # AVX-512 VNNI or AVX-VNNI: int8 dot products (torch's `_int_mm` through oneDNN)
    amx: bool = False  # AMX tiles with int8 and bf16 (Sapphire Rapids and later)
    lowbit: bool = False  # our AVX2 kernels are built here
    amx_kernels: bool = False  # our AMX kernels are built and the kernel grants tile state
    vnni_kernels: bool = False  # our AVX-512 VNNI kernels are built (the AMX build's VNNI half: Zen 4/5 too)

    @property
    def native_bf16(self) -> bool:
        """bf16 arithmetic in hardware (else torch emulates it through fp32 conversions)."""
        return self.avx512_bf16 or self.amx

    @property
    def tier(self) -> str:
        """The capability class the rules' measurements are named by."""
        if self.amx:
            return "AMX"
        if self.avx512_bf16:
            return "AVX-512 BF16"
        if self.vnni:
            return "AVX-512 VNNI"
        return "AVX2" if self.avx2 else "no AVX2"

    def describe(self) -> str:
        names = [("avx2", "AVX2"), ("avx512", "AVX-512"), ("avx512_bf16", "AVX-512 BF16"), ("vnni", "VNNI"),
                 ("amx", "AMX")]
        flags = [label for attr, label in names if getattr(self, attr)] or ["no AVX2"]
        built = [label for attr, label in (("lowbit", "our AVX2 kernels"), ("vnni_kernels", "our VNNI kernels"),
                                           ("amx_kernels", "our AMX kernels")) if getattr(self, attr)]
        return ", ".join(flags) + (f" ({' and '.join(built)} built)" if built else "")


def flags_caps(flags: frozenset[str]) -> CpuCaps:
    """The capabilities /proc/cpuinfo's `flags` name (our builds not looked at)."""
    return CpuCaps(
        avx2={"avx2", "fma", "f16c"} <= flags,
        avx512={"avx512f", "avx512bw", "avx512vl"} <= flags,
        avx512_bf16="avx512_bf16" in flags,
        vnni=bool({"avx512_vnni", "avx_vnni"} & flags),
        amx={"amx_tile", "amx_int8", "amx_bf16"} <= flags,
    )


def detect() -> CpuCaps:
    """This machine's capabilities, and which of our kernel builds exist here."""
    from optcli.engine.kernels import cpu_amx, cpu_lowbit

    caps = flags_caps(cpu_flags())
    return replace(caps, lowbit=cpu_lowbit.library() is not None, amx_kernels=cpu_amx.library() is not None,
                   vnni_kernels=cpu_amx.vnni_library() is not None)
