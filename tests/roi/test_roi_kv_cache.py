"""`--kv-cache-dtype`: roi sizes the KV cache in the dtype chosen; serve, profile and roi refuse a bad value
with one line and exit 2 before any work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from optcli.cli import app

LLAMA_31_8B = {"num_hidden_layers": 32, "hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
               "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 131072,
               "torch_dtype": "bfloat16"}


def estimate(tmp_path: Path, *extra: str) -> dict:
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_31_8B))
    result = CliRunner().invoke(app, ["roi", "--estimate", str(tmp_path), "--gpu", "H100-80GB", *extra, "--json"])
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.parametrize(("kv_dtype", "per_token"), [(None, 131_072), ("auto", 131_072), ("bfloat16", 131_072),
                                                     ("fp8", 65_536), ("fp8_e4m3", 65_536), ("int8", 65_536)])
def test_estimate_sizes_the_cache_in_the_chosen_dtype(tmp_path: Path, kv_dtype: str | None, per_token: int) -> None:
    base = estimate(tmp_path)
    out = estimate(tmp_path, *(["--kv-cache-dtype", kv_dtype] if kv_dtype else []))
    memory = out["plan"]["memory"]
    assert memory["kv_bytes_per_token"] == per_token  # 32 layers x 8 KV heads x 128 x (K, V) x bytes
    assert out["inputs"]["kv_cache_dtype"]["source"] == ("flag" if kv_dtype else "default")
    if per_token == 65_536:  # half the bytes a sequence: twice the sequences in the same free memory
        seqs, base_seqs = memory["max_concurrent_seqs"], base["plan"]["memory"]["max_concurrent_seqs"]
        assert base_seqs * 2 <= seqs <= base_seqs * 2 + 1
        assert out["plan"]["roofline"]["output_tok_s"] > base["plan"]["roofline"]["output_tok_s"]  # fewer bytes read


def test_a_report_s_kv_cache_dtype_is_planned_for(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_31_8B))
    report = {"model": str(tmp_path), "throughput": {"total_tok_s": 100.0, "output_tok_s": 50.0},
              "workload": {"engine": {"dtype_requested": "auto", "kv_cache_dtype": "int8"}},
              "hardware": {"device": "cuda", "gpu": None}}
    (tmp_path / "report.json").write_text(json.dumps(report))
    result = CliRunner().invoke(app, ["roi", "--report", str(tmp_path / "report.json"), "--gpu", "H100-80GB",
                                      "--json"])
    assert result.exit_code == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["inputs"]["kv_cache_dtype"] == {"value": "int8", "source": "report"}


@pytest.mark.parametrize("command", [["serve", "builtin:tiny-llama"], ["profile", "builtin:tiny-llama"],
                                     ["roi", "--estimate", "builtin:tiny-llama"]])
def test_a_bad_kv_cache_dtype_is_one_line_and_exit_2(command: list[str]) -> None:
    result = CliRunner().invoke(app, [*command, "--kv-cache-dtype", "fp4"])
    assert result.exit_code == 2, (result.stdout, result.stderr)
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "--kv-cache-dtype must be one of auto, bfloat16, float16, fp8, fp8_e4m3, int8" in lines[0]
