"""Which CPU kernel a layer runs at each batch size: decided by rules on the CPU's flags, the layer and the
bucket (engine/quant/cpu_choice.py), never by timing; each kernel class says whether it can run a layer and
why not (engine/quant/cpu_kernels.py). Fake capabilities stand for an AVX2-only, an AVX-512 VNNI, an
AVX-512 BF16 and an AMX CPU."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import torch

from optcli.engine.kernels import cpu_amx, cpu_lowbit, cpu_threads
from optcli.engine.kernels.cpu_caps import CpuCaps, flags_caps
from optcli.engine.kernels.cpu_threads import CpuShare, ThreadGovernor, cgroup_quota
from optcli.engine.quant import cpu_choice, cpu_kernels, cpu_tune
from optcli.engine.quant.cpu_choice import KERNELS, LABELS, bucket, plan_for
from optcli.engine.quant.cpu_kernels import LinearSpec
from optcli.engine.quant.linear import Int4Linear, Int8Linear
from optcli.engine.quant.weights import Int4Weight, Int8Weight

AVX2 = CpuCaps(avx2=True, lowbit=True)
VNNI = CpuCaps(avx2=True, avx512=True, vnni=True, lowbit=True)
BF16 = CpuCaps(avx2=True, avx512=True, vnni=True, avx512_bf16=True, lowbit=True)
AMX = CpuCaps(avx2=True, avx512=True, vnni=True, avx512_bf16=True, amx=True, lowbit=True, amx_kernels=True,
              vnni_kernels=True)
ZEN5 = CpuCaps(avx2=True, avx512=True, vnni=True, avx512_bf16=True, lowbit=True, vnni_kernels=True)
BARE = CpuCaps()  # no AVX2, nothing of ours built: torch's own paths only

# the Llama-3.2-1B gate_up layer under `--dtype auto` (bf16 activations where the CPU has bf16, else fp32
# with 16-bit compute allowed), and the same under an explicit --dtype float32
def spec(fmt: str, dtype=torch.bfloat16, bf16_ok=True, **kw) -> LinearSpec:
    return LinearSpec(fmt, 16384, 2048, dtype, bf16_ok, kw.pop("group_size", 128), kw.pop("act_quant", fmt == "int8"))


def picks(s: LinearSpec, caps: CpuCaps) -> list[str]:
    return [k.name for k in plan_for(s, caps).kernels]


def test_buckets_cover_every_batch_size() -> None:
    assert [bucket(m) for m in (1, 2, 4, 5, 16, 17, 64, 65, 256, 257, 10_000)] == [0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    assert LABELS == ("1", "2-4", "5-16", "17-64", "65-256", ">256")


def test_flags_from_cpuinfo() -> None:
    zen5 = flags_caps(frozenset("fma f16c avx2 avx512f avx512bw avx512vl avx512_bf16 avx512_vnni".split()))
    assert (zen5.native_bf16, zen5.vnni, zen5.amx, zen5.tier) == (True, True, False, "AVX-512 BF16")
    spr = flags_caps(frozenset("fma f16c avx2 avx512f avx512bw avx512vl avx512_bf16 avx512_vnni amx_tile amx_int8 "
                               "amx_bf16".split()))
    assert spr.tier == "AMX" and spr.native_bf16
    epyc2 = flags_caps(frozenset("fma f16c avx2".split()))
    assert (epyc2.tier, epyc2.native_bf16, epyc2.vnni) == ("AVX2", False, False)


@pytest.mark.parametrize(("caps", "yes", "no"), [
    (AVX2, {"int4:q4q8-avx2", "int8:q8q8-avx2", "bf16:bf16w-dot", "fp8:fp8-dot"},
     {"int4:q4-amx": "no AMX", "int8:q8-amx": "no AMX", "int8:int_mm": "VNNI", "bf16:onednn-bf16": "native bf16",
      "fp8:fp8-amx": "no AMX"}),
    (VNNI, {"int4:q4q8-avx2", "int8:int_mm", "bf16:bf16w-dot"}, {"int4:q4-amx": "no AMX", "bf16:onednn-bf16": "native"}),
    (BF16, {"int4:q4q8-avx2", "int8:int_mm", "bf16:onednn-bf16"}, {"int4:q4-amx": "no AMX", "fp8:fp8-amx": "no AMX"}),
    (AMX, {"int4:q4-amx", "int4:q4-vnni", "int8:q8-amx", "fp8:fp8-amx", "bf16:onednn-bf16", "int8:int_mm"}, {}),
    (ZEN5, {"int4:q4-vnni", "int8:q8-vnni", "int8:int_mm", "bf16:onednn-bf16", "fp8:fp8-bf16dot"},
     {"int4:q4-amx": "no AMX", "fp8:fp8-amx": "no AMX"}),
    (BARE, {"int4:int4pack-bf16", "bf16:widen-onednn", "fp8:dequant"},
     {"int4:q4q8-avx2": "not built", "bf16:bf16w-dot": "not built", "fp8:fp8-dot": "not built"}),
])
def test_each_kernel_says_whether_it_runs_a_layer_and_why_not(caps, yes, no) -> None:
    seen = set()
    for kernel in KERNELS:
        s = spec(kernel.fmt, act_quant=kernel.fmt in ("int8", "fp8"))
        ok, why = kernel.can_implement(s, caps)
        key = f"{kernel.fmt}:{kernel.name}"
        assert ok == (not why), key
        if key in yes:
            assert ok, (key, why)
        if key in no:
            assert not ok and no[key] in why, (key, why)
        seen.add(key)
    assert set(yes) | set(no) <= seen


def test_kernels_that_would_round_refuse_an_explicit_fp32_model() -> None:
    fp32 = spec("int4", torch.float32, bf16_ok=False)
    assert not cpu_kernels.Q4q8Avx2.can_implement(fp32, AVX2)[0]
    assert not cpu_kernels.Q4Amx.can_implement(fp32, AMX)[0]
    assert cpu_kernels.Q4LowbitDequant.can_implement(fp32, AVX2)[0]
    assert not cpu_kernels.Bf16Onednn.can_implement(spec("bf16", torch.float32, False), AMX)[0]
    assert not cpu_kernels.Q4Amx.can_implement(spec("int4", group_size=32), AMX)[0]  # a shape its tiles cannot hold


@pytest.mark.parametrize(("fmt", "caps", "dtype", "want"), [
    # a bf16 weight: our widening dot kernel at few rows; batched steps on bf16 units where the CPU has them
    ("bf16", BF16, torch.bfloat16, ["bf16w-dot"] * 2 + ["onednn-bf16"] * 4),
    ("bf16", AMX, torch.bfloat16, ["bf16-dpbf16"] * 2 + ["onednn-bf16"] * 4),
    ("bf16", ZEN5, torch.bfloat16, ["bf16-dpbf16"] * 2 + ["onednn-bf16"] * 4),
    ("bf16", ZEN5, torch.float32, ["bf16w-dot"] * 2 + ["bf16w-panels"] * 4),  # --dtype float32: no bf16 rounding
    ("bf16", AVX2, torch.float32, ["bf16w-dot"] * 2 + ["bf16w-panels"] * 4),
    ("bf16", BARE, torch.float32, ["widen-onednn"] * 6),
    ("int4", AMX, torch.bfloat16, ["q4-amx"] * 6),
    ("int4", BF16, torch.bfloat16, ["q4q8-avx2"] * 6),  # VNNI kernels not built
    ("int4", ZEN5, torch.bfloat16, ["q4-vnni"] * 6),
    ("int4", AVX2, torch.float32, ["q4q8-avx2"] * 6),
    ("int4", BARE, torch.float32, ["int4pack-bf16"] * 4 + ["dequant"] * 2),
    ("int8", AMX, torch.bfloat16, ["q8-amx"] * 6),
    ("int8", ZEN5, torch.bfloat16, ["q8-vnni"] * 6),
    ("int8", VNNI, torch.float32, ["q8q8-avx2"] * 4 + ["int_mm"] * 2),
    ("int8", AVX2, torch.float32, ["q8q8-avx2"] * 6),
    ("fp8", AMX, torch.bfloat16, ["fp8-amx"] * 6),
    ("fp8", ZEN5, torch.bfloat16, ["fp8-bf16dot"] * 6),
    ("fp8", AVX2, torch.float32, ["fp8-dot"] * 2 + ["fp8-panels"] * 4),
])
def test_the_rules_pick_per_bucket(fmt, caps, dtype, want) -> None:
    s = spec(fmt, dtype, act_quant=fmt in ("int8", "fp8"))
    plan = plan_for(s, caps)
    assert [k.name for k in plan.kernels] == want
    table = plan.table()
    assert list(table) == list(LABELS)
    assert all(entry["reason"] and caps.tier in entry["reason"] for entry in table.values())


def test_a_kernel_passed_over_is_named_with_its_reason() -> None:
    reason = plan_for(spec("int4"), AVX2).table()["1"]["reason"]
    assert "q4-amx: no AMX" in reason and reason.startswith("our AVX2 q4 x q8 kernel")
    # without our kernels torch's int4 layout is chosen at one row, and the larger buckets stay in it
    assert plan_for(spec("int4"), BARE).layout == "int4pack"


def test_selection_never_times_anything(monkeypatch) -> None:
    """The same paths busy or not: choosing (and running) never reads a clock."""
    def no_clock():
        raise AssertionError("kernel selection must not time anything")

    layers = [Int4Linear(Int4Weight.rtn(torch.randn(64, 256), 64), compute_dtypes=(torch.bfloat16,)),
              Int8Linear(Int8Weight.rtn(torch.randn(64, 256)), compute_dtypes=(torch.bfloat16,))]
    first = [layer.plan for layer in layers]
    monkeypatch.setattr(time, "perf_counter", no_clock)
    monkeypatch.setattr(time, "monotonic", no_clock)
    monkeypatch.delenv("OPTCLI_CPU_KERNEL", raising=False)
    monkeypatch.delenv("OPTCLI_CPU_TUNE", raising=False)
    again = [Int4Linear(Int4Weight.rtn(torch.randn(64, 256), 64), compute_dtypes=(torch.bfloat16,)),
             Int8Linear(Int8Weight.rtn(torch.randn(64, 256)), compute_dtypes=(torch.bfloat16,))]
    for layer in again:
        for m in (1, 3, 40, 300):
            layer(torch.randn(m, 256))
    assert [layer.plan for layer in again] == first
    for caps in (AVX2, VNNI, BF16, AMX, BARE):
        for fmt in ("bf16", "int4", "int8", "fp8"):
            assert plan_for(spec(fmt), caps) == plan_for(spec(fmt), caps)


def test_the_environment_still_forces_a_kernel(monkeypatch) -> None:
    weight = Int8Weight.rtn(torch.randn(64, 256))
    monkeypatch.setenv("OPTCLI_CPU_KERNEL", "dequant")
    forced = Int8Linear(weight, compute_dtypes=(torch.bfloat16,))
    assert {k.name for k in forced.plan.kernels} == {"dequant"}
    assert forced.plan_table()["1"]["reason"] == "forced by OPTCLI_CPU_KERNEL"
    monkeypatch.setenv("OPTCLI_CPU_KERNEL", "no-such-kernel")  # a name no kernel has: the rules decide
    assert Int8Linear(weight, compute_dtypes=(torch.bfloat16,)).plan == plan_for(
        LinearSpec("int8", 64, 256, torch.float32, True, act_quant=True))


@pytest.mark.skipif(cpu_lowbit.library() is None, reason="no AVX2 kernels here")
def test_the_engine_reports_each_layer_kinds_kernels_and_the_dtype_reason(monkeypatch) -> None:
    from optcli.engine import Engine

    monkeypatch.delenv("OPTCLI_CPU_KERNEL", raising=False)
    engine = Engine("builtin:tiny-llama", max_model_len=128, dtype="float32")
    stats = engine.stats()
    assert stats["dtype_reason"] == "requested"
    kernels = stats["kernels"]
    assert set(kernels) == {"qkv", "o", "gate_up", "down", "lm_head"}
    for entry in kernels.values():
        assert entry["format"] == "bf16" and list(entry["buckets"]) == list(LABELS)
        assert entry["buckets"]["1"]["kernel"] == "bf16w-dot"  # fp32 math over the checkpoint's bf16 weights
        assert "onednn-bf16" not in {b["kernel"] for b in entry["buckets"].values()}  # would round activations
    assert kernels["qkv"]["layers"] == 4 and kernels["lm_head"]["layers"] == 1
    assert json.loads(json.dumps(stats)) == stats


def test_opt_in_tuning_keeps_a_robust_winner_and_refuses_a_busy_machine(monkeypatch, tmp_path) -> None:
    from optcli.engine.kernels.tuning import SavedChoices

    monkeypatch.setattr(cpu_tune, "STORE", SavedChoices(lambda: tmp_path / "tuned.json"))
    monkeypatch.setattr(cpu_amx, "library", lambda: None)  # the int8-rows layout: several kernels to time
    monkeypatch.setattr(cpu_amx, "vnni_library", lambda: None)
    monkeypatch.setenv("OPTCLI_CPU_TUNE", "1")
    monkeypatch.delenv("OPTCLI_CPU_KERNEL", raising=False)
    layer = Int8Linear(Int8Weight.rtn(torch.randn(64, 256)), compute_dtypes=(torch.bfloat16,))
    rule = layer.plan.kernel(1).name
    other = next(name for name in layer.paths if name != rule)
    cost = {name: 10e-3 for name in layer.paths} | {other: 1e-3}  # seconds per call on a fake clock

    def fake_seconds(fn, x):
        return cost[next(n for n, f in layer.paths.items() if f == fn)]

    monkeypatch.setattr(cpu_tune, "_seconds", fake_seconds)
    monkeypatch.setattr(CpuShare, "sample", lambda self: {"others_cores": 1.0, "steal_cores": 0.0, "seconds": 1.0})
    assert layer.cpu_matmul(torch.randn(1, 256)) is not None
    assert layer.tuned[0][0] == rule and "refused" in layer.tuned[0][1]
    assert not (tmp_path / "tuned.json").exists()  # a busy measurement is not kept
    layer.tuned = None
    monkeypatch.setattr(CpuShare, "sample", lambda self: {"others_cores": 0.0, "steal_cores": 0.0, "seconds": 1.0})
    layer.cpu_matmul(torch.randn(1, 256))
    assert layer.tuned[0][0] == other and "tuned" in layer.tuned[0][1]
    assert json.loads((tmp_path / "tuned.json").read_text())  # kept for the next tuned run
    assert layer.plan_table()["1"]["kernel"] == other
    monkeypatch.delenv("OPTCLI_CPU_TUNE")
    assert not cpu_choice.tuning_enabled()  # off by default: the rules alone


def test_threads_follow_the_free_cores(monkeypatch) -> None:
    monkeypatch.delenv("OPTCLI_CPU_THREADS", raising=False)
    monkeypatch.setattr(cpu_threads.BOOT, "sample", lambda: {"others_cores": 1.2, "seconds": 2.0})
    before = torch.get_num_threads()
    try:
        assert ThreadGovernor(max_threads=2).threads == 1  # the load while the model loaded: one core is taken
        monkeypatch.setattr(cpu_threads.BOOT, "sample", lambda: None)  # nothing to start from
        gov = ThreadGovernor(max_threads=2, interval=0.0)
        assert gov.threads == 2
        assert [gov.target(o) for o in (0.0, 0.4, 0.6, 1.0, 1.9)] == [2, 2, 1, 1, 1]
        samples = iter([1.0, 0.0, 1.0, 0.0, 0.0])
        monkeypatch.setattr(gov._share, "sample", lambda: {"others_cores": next(samples)})
        # the first sample sets the count; after it, two samples in a row must agree
        assert [gov.update() for _ in range(5)] == [1, 1, 1, 1, 2]
        assert torch.get_num_threads() == 2 and gov.stats()["changes"] == 2
        monkeypatch.setenv("OPTCLI_CPU_THREADS", "1")
        assert ThreadGovernor().stats() == {"max": 1, "current": 1, "changes": 0, "pinned": True, "others_cores": None,
                                           "reason": "1 thread(s): OPTCLI_CPU_THREADS"}
    finally:
        torch.set_num_threads(before)


def test_a_small_model_computes_on_one_thread_quiet_or_busy(monkeypatch) -> None:
    """The size rule (benchmarks/thread_rule.py): matmuls under SPLIT_MIN_ELEMENTS on average, one thread,
    whatever the load; the user's pin wins."""
    small, large = cpu_threads.SPLIT_MIN_ELEMENTS / 2, cpu_threads.SPLIT_MIN_ELEMENTS * 2
    assert cpu_threads.size_ceiling(small, 2)[0] == 1 and "quiet or busy" in cpu_threads.size_ceiling(small, 2)[1]
    assert cpu_threads.size_ceiling(large, 2)[0] == 2 and cpu_threads.size_ceiling(None, 4)[0] == 4
    assert cpu_threads.size_ceiling(small, 1)[0] == 1
    monkeypatch.delenv("OPTCLI_CPU_THREADS", raising=False)
    monkeypatch.setattr(cpu_threads, "usable_cores", lambda: 2)
    before = torch.get_num_threads()
    try:
        for others in (0.0, 1.0):  # a quiet and a busy start: the same ceiling and count
            monkeypatch.setattr(cpu_threads.BOOT, "sample", lambda o=others: {"others_cores": o, "seconds": 2.0})
            gov = ThreadGovernor(mean_matmul=small)
            assert (gov.max_threads, gov.threads) == (1, 1) and "quiet or busy" in gov.stats()["reason"]
        monkeypatch.setattr(cpu_threads.BOOT, "sample", lambda: {"others_cores": 0.0, "seconds": 2.0})
        torch.set_num_threads(2)
        cpu_threads._LAST_SET[:] = [2]  # a count the governor set: no user's ceiling
        assert ThreadGovernor(mean_matmul=large).threads == 2
        monkeypatch.setenv("OPTCLI_CPU_THREADS", "2")
        assert ThreadGovernor(mean_matmul=small).threads == 2  # the user's pin wins over the rule
    finally:
        torch.set_num_threads(before)


def test_a_source_and_its_artifact_get_the_same_thread_ceiling(tmp_path) -> None:
    """By shape, not bytes: the demo model and its 4-bit artifact measure the same mean matmul."""
    from optcli.engine import Engine
    from optcli.engine.quant.cpu_choice import mean_matmul_size

    before = torch.get_num_threads()
    try:
        quantized = Engine("builtin:tiny-llama", device="cpu", quantization="w4a16")
        dense = Engine("builtin:tiny-llama", device="cpu")
    finally:
        torch.set_num_threads(before)
    assert quantized.quantized_layers and mean_matmul_size(quantized.model) == mean_matmul_size(dense.model)
    assert quantized.thread_rule()["ceiling"] == dense.thread_rule()["ceiling"]


def test_cgroup_quota_caps_the_threads(tmp_path) -> None:
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert cgroup_quota(tmp_path) == 1.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cgroup_quota(tmp_path) is None


def test_a_busy_process_is_seen_as_others_cpu() -> None:
    share = CpuShare()
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(1.0)
        share.sample()  # from here the hog is running
        time.sleep(1.0)
        seen = share.sample()
    finally:
        hog.kill()
        hog.wait()
    assert seen is not None and seen["others_cores"] >= 0.5, seen


@pytest.mark.parametrize("group", [32, 43])
def test_int4_rows_not_a_multiple_of_16_get_a_kernel(group: int) -> None:
    """stories260K's gate/up (172 rows, 344 fused) at group 32, and its 172-wide down_proj at group 43
    (mixed precision's finer rungs): no kernel of torch's int4 layout takes them, and asking must not
    crash torch's packing (it once did: the layout probe ran before the shape check)."""
    weight = Int4Weight.rtn(torch.randn(172, 172 if group == 43 else 64), group, symmetric=False)
    layer = Int4Linear(weight, compute_dtypes=(torch.float32,))
    x = torch.randn(3, weight.shape[1])
    torch.testing.assert_close(layer(x), x @ weight.dequantize().t(), atol=1e-3, rtol=1e-3)
