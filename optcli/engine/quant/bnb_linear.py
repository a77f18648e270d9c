"""The bitsandbytes formats' linear layers, NF4 and LLM.int8, on bitsandbytes' own layout: its kernels on
CUDA, ours (`kernels/cpu_lowbit.c`) or a dequantize + dense GEMM on CPU."""

from __future__ import annotations

import torch

from optcli.engine.kernels import cpu_lowbit
from optcli.engine.kernels.dense_gemm import dense_linear
from optcli.engine.quant.cpu_kernels import LinearSpec
from optcli.engine.quant.linear import QuantLinear
from optcli.engine.quant.weights import INT8_MAX, BnbInt8Weight, BnbNf4Weight


class BnbNf4Linear(QuantLinear):
    """bitsandbytes NF4/FP4. On an AVX2 CPU our float kernels on bitsandbytes' own layout
    (`kernels/cpu_lowbit.c`: a 16-entry code book looked up 8 values at a time) run it (`cpu_choice.py`'s
    rule); bitsandbytes' CPU kernel measured 7x slower than the fp32 source at one row here."""

    kind = "nf4"

    def __init__(self, w: BnbNf4Weight, bias=None, device="cpu", dtype=torch.float32) -> None:
        super().__init__(w.out_features, w.in_features, bias, device, dtype)
        self.register_buffer("packed", w.packed.to(device))
        self.register_buffer("absmax", w.absmax.to(device))
        self.register_buffer("code", w.code.to(device))
        self.blocksize, self.quant_type = w.blocksize, w.quant_type
        self.mode = "bitsandbytes"
        if torch.device(device).type == "cpu":
            spec = LinearSpec("nf4", self.out_features, self.in_features, dtype, group_size=self.blocksize)
            if self.set_cpu_plan(spec).kernels[0].name != "bitsandbytes":
                self.mode = "cpu"

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.plan is not None:
            return self.cpu_matmul(x)
        return self._bnb(x)

    def _nf4(self, x: torch.Tensor) -> torch.Tensor:
        return cpu_lowbit.nf4_gemm(x, self.packed, self.absmax, self.code, self.blocksize,
                                   self.out_features).to(x.dtype)

    def _dequant_nf4(self, x: torch.Tensor) -> torch.Tensor:
        w = cpu_lowbit.nf4_dequantize(self.packed, self.absmax, self.code, self.blocksize, self.out_features,
                                      self.in_features)
        return dense_linear(x, w.to(x.dtype))

    def _bnb(self, x: torch.Tensor) -> torch.Tensor:
        import bitsandbytes as bnb
        from bitsandbytes.functional import QuantState

        state = QuantState(absmax=self.absmax, shape=torch.Size((self.out_features, self.in_features)),
                           code=self.code, blocksize=self.blocksize, quant_type=self.quant_type, dtype=x.dtype)
        return bnb.matmul_4bit(x, self.packed.t(), quant_state=state)


class BnbInt8Linear(QuantLinear):
    """bitsandbytes LLM.int8(). On an AVX2 CPU the same decomposition as bitsandbytes' own CPU code
    (activation values >= threshold out, their columns in float; the rest per-row int8 against the
    int8 rows) with the int8 part in our exact int8 GEMM and the float parts in fp32 rather than fp16,
    run by rule (`cpu_choice.py`); bitsandbytes' CPU path is 7x slower than the fp32 source at one row here."""

    kind = "int8-bnb"

    def __init__(self, w: BnbInt8Weight, bias=None, device="cpu", dtype=torch.float32) -> None:
        super().__init__(*w.shape, bias, device, dtype)
        self.register_buffer("qweight", w.q.to(device))
        self.register_buffer("scb", w.scb.to(device))
        self.threshold = w.threshold
        self.mode = "bitsandbytes"
        self.register_buffer("row_scales", (w.scb.float() / INT8_MAX).to(device), persistent=False)
        if torch.device(device).type == "cpu":
            spec = LinearSpec("int8-bnb", self.out_features, self.in_features, dtype)
            if self.set_cpu_plan(spec).kernels[0].name != "bitsandbytes":
                self.mode = "cpu"

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.plan is not None:
            return self.cpu_matmul(x)
        return self._bnb(x)

    def _q8q8(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        outlier_cols = None
        if self.threshold > 0:
            outliers = xf.abs() >= self.threshold
            if outliers.any():
                outlier_cols = outliers.any(0).nonzero().view(-1)
                xf = xf.masked_fill(outliers, 0)
        row_max = xf.abs().amax(-1, keepdim=True)
        xq = torch.round(xf * (INT8_MAX / row_max)).nan_to_num_(0).to(torch.int8)
        if outlier_cols is not None:
            xq[:, outlier_cols] = 0
        y = cpu_lowbit.q8_gemm(xq, row_max / INT8_MAX, self.qweight, self.row_scales)
        if outlier_cols is not None:  # the outlier columns in float, from the original activations
            w = self.qweight[:, outlier_cols].float() * self.row_scales[:, None]
            y = y.addmm(x.float()[:, outlier_cols], w.t())
        return y.to(x.dtype)

    def _bnb(self, x: torch.Tensor) -> torch.Tensor:
        import bitsandbytes as bnb

        state = bnb.MatmulLtState()
        state.CB, state.SCB, state.threshold = self.qweight, self.scb, self.threshold
        state.has_fp16_weights, state.is_training = False, False
        # LLM.int8 computes in fp16 (bitsandbytes would cast, and warn on every call).
        return bnb.matmul(x.half(), self.qweight, state=state).to(x.dtype)
