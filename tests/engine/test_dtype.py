"""The dtype the engine computes in: `auto`'s rule, explicit choices honoured end to end (engine,
profile, serve, planner), and greedy equality with transformers in the dtype it runs in."""

from __future__ import annotations

import json
import time

import pytest
import torch
from typer.testing import CliRunner

from optcli.cli import app
from optcli.config import EngineConfig
from optcli.engine.kernels.cpu_caps import CpuCaps
from optcli.engine.loading import placement
from optcli.engine.loading.placement import resolve_dtype
from optcli.errors import UsageError

PROMPTS = ["Once upon a time", "The little dog", "Lily and Tom went to the park to play", "One day"]


def test_auto_on_cuda_is_the_checkpoint_dtype_and_bf16_for_fp32() -> None:
    assert resolve_dtype("auto", "cuda", "float16")[0] == "float16"
    assert resolve_dtype("auto", "cuda", "bfloat16")[0] == "bfloat16"
    assert resolve_dtype("auto", "cuda", "float32")[0] == "bfloat16"
    assert resolve_dtype("auto", "cuda:1", None)[0] == "bfloat16"


@pytest.mark.parametrize(("caps", "expected"), [(CpuCaps(avx2=True, lowbit=True), "float32"),
                                              (CpuCaps(avx2=True, avx512=True, vnni=True), "float32"),
                                              (CpuCaps(avx2=True, avx512=True, avx512_bf16=True), "bfloat16"),
                                              (CpuCaps(avx2=True, avx512=True, avx512_bf16=True, amx=True), "bfloat16")])
def test_auto_on_cpu_is_a_rule_on_the_flags(caps, expected) -> None:
    """bf16 exactly where the CPU has it natively (AVX-512 BF16 or AMX); the reason says which."""
    dtype, reason = placement.cpu_auto_dtype(caps)
    assert dtype == expected and reason.startswith("auto:")
    assert ("AMX" in reason) == caps.amx or expected == "float32"


def test_auto_on_cpu_never_times_anything(monkeypatch) -> None:
    """The same answer busy or not: resolving the dtype runs no clock (a timing race decided it before)."""
    def no_clock():
        raise AssertionError("dtype auto must not time anything")

    monkeypatch.setattr(time, "perf_counter", no_clock)
    monkeypatch.setattr(time, "monotonic", no_clock)
    dtype, _ = resolve_dtype("auto", "cpu", "float32")
    native = bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    assert dtype == ("bfloat16" if native else "float32")


def test_an_explicit_dtype_is_honoured_and_a_bad_one_refused() -> None:
    assert resolve_dtype("float16", "cpu", "bfloat16") == ("float16", "requested")
    with pytest.raises(UsageError, match="dtype must be one of"):
        EngineConfig(dtype="fp8")
    with pytest.raises(TypeError, match="max_num_seq"):
        EngineConfig().with_options(max_num_seq=4)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_greedy_equals_transformers_in_the_dtype_it_runs_in(stories_dir, dtype: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from optcli.engine import Engine, SamplingParams

    engine = Engine(str(stories_dir), dtype=dtype, max_num_seqs=8, max_model_len=512)
    assert engine.config.dtype == dtype and engine.stats()["dtype"] == dtype
    assert engine.kv_cache.dtype == getattr(torch, dtype)
    outs = engine.generate(PROMPTS, SamplingParams(max_tokens=40))
    tokenizer = AutoTokenizer.from_pretrained(stories_dir)
    hf = AutoModelForCausalLM.from_pretrained(stories_dir, dtype=getattr(torch, dtype)).eval()
    for prompt, out in zip(PROMPTS, outs, strict=True):
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        expected = hf.generate(ids, max_new_tokens=40, do_sample=False)[0, ids.shape[1]:].tolist()
        assert out.token_ids == expected[: len(out.token_ids)] and len(out.token_ids) == len(expected)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_profile_runs_and_records_the_dtype(stories_dir, tmp_path, dtype: str) -> None:
    result = CliRunner().invoke(app, ["profile", str(stories_dir), "--device", "cpu", "--dtype", dtype, "--requests", "3",
                                      "--output-len", "4", "--prompt-len", "4:8", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["workload"]["engine"]["dtype"] == dtype
    assert report["workload"]["engine"]["dtype_reason"] == "requested"
    assert report["memory"]["kv_cache_bytes"] % (2 if dtype == "bfloat16" else 4) == 0


def test_profile_records_the_kernel_paths_of_both_models_and_why(stories_dir) -> None:
    """report.json says which kernel each layer kind runs at each batch-size bucket, for the model and its
    baseline, and why the dtype is what it is: the rules' decisions, the same in every run on a machine."""
    args = ["profile", str(stories_dir), "--baseline", str(stories_dir), "--device", "cpu", "--requests", "3",
            "--output-len", "4", "--prompt-len", "4:8", "--json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    engine = json.loads(result.stdout)["workload"]["engine"]
    assert engine["dtype_reason"].startswith("auto:") and engine["baseline_dtype_reason"] == engine["dtype_reason"]
    kernels = engine["kernels"]
    assert {"qkv", "o", "gate_up", "down", "lm_head"} <= set(kernels) and kernels == engine["baseline_kernels"]
    for entry in kernels.values():
        assert all(b["kernel"] and b["reason"] for b in entry["buckets"].values())


def test_profile_refuses_an_unknown_dtype(stories_dir) -> None:
    result = CliRunner().invoke(app, ["profile", str(stories_dir), "--dtype", "fp64"])
    assert result.exit_code == 2
    assert "--dtype must be one of" in result.output


def test_serve_builds_its_engine_from_the_flags(monkeypatch, stories_dir) -> None:
    import optcli.serve.server as server

    seen = {}
    monkeypatch.setattr(server, "run_server", lambda *args, **kwargs: seen.update(config=args[5]))
    result = CliRunner().invoke(app, ["serve", str(stories_dir), "--dtype", "bfloat16", "--max-num-seqs", "3",
                                      "--max-model-len", "128", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert seen["config"] == EngineConfig(device="cpu", dtype="bfloat16", max_num_seqs=3, max_model_len=128)


def test_the_planner_sizes_kv_in_the_dtype_serve_would_use() -> None:
    from optcli.roi import planner

    shape = planner.model_shape({"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128,
                                 "num_attention_heads": 4, "vocab_size": 100, "torch_dtype": "float32"})
    _, scheme = planner.scheme_for("bf16")
    auto = planner.plan_for_engine(shape, scheme, 2**30, 256, 1, EngineConfig())
    fp32 = planner.plan_for_engine(shape, scheme, 2**30, 256, 1, EngineConfig(dtype="float32"))
    assert auto["dtype"] == "bfloat16" and fp32["dtype"] == "float32"
    assert fp32["kv_bytes_per_token"] == 2 * auto["kv_bytes_per_token"]


def test_roi_plans_kv_in_the_serving_dtype(tmp_path) -> None:
    config = {"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 4, "hidden_size": 256,
              "intermediate_size": 768, "num_attention_heads": 8, "num_key_value_heads": 4, "vocab_size": 1024,
              "torch_dtype": "float32"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    plans = {}
    for dtype in (None, "float32"):
        args = ["roi", "--estimate", str(tmp_path / "config.json"), "--gpu", "h100", "--json"]
        result = CliRunner().invoke(app, args + (["--dtype", dtype] if dtype else []))
        assert result.exit_code == 0, result.output
        plans[dtype] = json.loads(result.stdout)["plan"]["memory"]
    assert plans[None]["dtype"] == "bfloat16" and plans["float32"]["dtype"] == "float32"
    assert plans["float32"]["kv_bytes_per_token"] == 2 * plans[None]["kv_bytes_per_token"]
