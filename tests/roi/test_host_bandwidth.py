"""The host's read bandwidth, which the batch-1 decode roofline (report.json) and benchmarks/quant_cpu.py
divide by: one probe for both, multi-threaded, with the thread count it ran at."""

from __future__ import annotations

import pytest
import torch

from optcli.engine.kernels import cpu_lowbit
from optcli.engine.kernels.cpu_threads import usable_cores
from optcli.roi import hardware


@pytest.mark.skipif(cpu_lowbit.library() is None, reason="no AVX2 kernels here")
def test_the_roofline_bandwidth_is_the_read_probe() -> None:
    hardware._BANDWIDTH.clear()
    before = torch.get_num_threads()
    got = hardware.peak_bandwidth("cpu")
    assert got["gbs"] and got["gbs"] > 0.5 and got["threads"] == usable_cores()  # the machine's, not the engine's
    assert torch.get_num_threads() == before
    assert got["source"].startswith("measured: read probe over")
    buf = torch.zeros(3 << 20, dtype=torch.uint8)  # every byte is read: a checksum of the 64-bit words
    buf[0], buf[(2 << 20) + 8], buf[-8] = 5, 7, 9
    assert cpu_lowbit.library().lowbit_read_probe(buf.data_ptr(), buf.numel()) == 21
