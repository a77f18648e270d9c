"""`optcli quantize` as scripts call it: exit codes, --json, one-line errors, atomic artifacts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from helpers import OPTCLI, optcli, shared_data

from optcli.builtin import model_dir, recipes_dir


def assert_usage_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, result.stderr  # one clear line, no traceback
    assert lines[0].startswith("error:")
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert result.stdout == ""


def test_quantize_json_is_one_object_and_the_artifact_loads(tmp_path: Path) -> None:
    out = tmp_path / "rtn"
    result = optcli("quantize", "builtin:tiny-llama", "--recipe", "w4a16-rtn", "--out", str(out), "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)  # exactly one JSON object, nothing else
    assert summary["artifact"] == str(out.absolute()) and summary["recipe"] == "w4a16-rtn"
    # bf16 source: 4-bit linears (+ a bf16 scale per 128) and the 16-bit tied embedding stay ~31% of it
    assert summary["size_bytes_after"] < 0.33 * summary["size_bytes_before"]
    manifest = json.loads((out / "optcli.json").read_text())
    assert manifest["recipe"]["llmcompressor"] and manifest["calibration"] is None
    assert set(manifest["layers"]) and all(v["scheme"] == "group128" for v in manifest["layers"].values())
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.quantization_config is not None


def test_nf4_quantizes_every_blockable_layer(tmp_path: Path) -> None:
    out = tmp_path / "nf4"
    result = optcli("quantize", "builtin:tiny-llama", "--recipe", "nf4-bnb", "--out", str(out), "--json")
    assert result.returncode == 0, result.stderr
    layers = json.loads((out / "optcli.json").read_text())["layers"]
    assert sum(v["scheme"] == "nf4" for v in layers.values()) == 28  # 4 layers x 7 projections
    assert json.loads(result.stdout)["size_bytes_after"] < 0.33 * json.loads(result.stdout)["size_bytes_before"]


@pytest.mark.parametrize("recipe", ["nf4-bnb", "int8-bnb"])
def test_bitsandbytes_refuses_a_moe_model(tmp_path: Path, recipe: str) -> None:
    """bitsandbytes replaces nn.Linear only; transformers holds experts fused, so they would stay 16-bit."""
    import transformers as T

    src = tmp_path / "mixtral"
    config = T.MixtralConfig(vocab_size=1024, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2)
    T.MixtralForCausalLM(config).save_pretrained(src)
    tokenizer = model_dir("tiny-llama")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (src / name).write_bytes((tokenizer / name).read_bytes())
    out = tmp_path / "out"
    assert_usage_error(optcli("quantize", str(src), "--recipe", recipe, "--out", str(out)), "mixture-of-experts",
                       "w4a16-rtn")
    assert not out.exists()


def test_existing_out_needs_force_and_force_replaces_only_an_artifact(tmp_path: Path) -> None:
    out = tmp_path / "taken"
    out.mkdir()  # empty: --force may use it
    assert_usage_error(optcli("quantize", "builtin:tiny-llama", "-r", "bf16", "--out", str(out)), "already exists", "--force")
    result = optcli("quantize", "builtin:tiny-llama", "-r", "bf16", "--out", str(out), "--force", "--json")
    assert result.returncode == 0, result.stderr
    assert (out / "optcli.json").exists()
    result = optcli("quantize", "builtin:tiny-llama", "-r", "bf16", "--out", str(out), "--force", "--json")
    assert result.returncode == 0, result.stderr  # an artifact: replaced
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "keep.txt").write_text("mine")
    assert_usage_error(optcli("quantize", "builtin:tiny-llama", "-r", "bf16", "--out", str(mine), "--force"),
                       str(mine), "keep.txt", "not a quantized artifact: kept")
    assert (mine / "keep.txt").read_text() == "mine" and sorted(p.name for p in mine.iterdir()) == ["keep.txt"]


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["./no/such/dir", "-r", "w4a16-rtn"], ["model directory not found"]),
        (["builtin:tiny-llama", "-r", "w4a16-gtpq"], ["unknown recipe", "w4a16-gptq"]),
        (["builtin:tiny-llama", "-r", "bf16", "--device", "tpu"], ["--device"]),
        (["builtin:tiny-llama", "-r", "w4a16-gptq", "--calibration", "./no/such/calib"], ["calibration set not found"]),
    ],
)
def test_bad_input_exits_2_and_writes_nothing(tmp_path: Path, args: list[str], needles: list[str]) -> None:
    out = tmp_path / "out"
    assert_usage_error(optcli("quantize", *args, "--out", str(out)), *needles)
    assert not out.exists() and not list(tmp_path.glob(".tmp-*"))


def test_recipe_typos_exit_2_naming_file_and_field(tmp_path: Path) -> None:
    ours = tmp_path / "typo.yaml"
    ours.write_text("name: t\ndescription: d\nbackend: none\nscheme: BF16\ncalibraton: {samples: 4}\n")
    assert_usage_error(optcli("quantize", "builtin:tiny-llama", "-r", str(ours), "--out", str(tmp_path / "o")),
                       str(ours), "calibraton", "allowed:")
    theirs = tmp_path / "lc.yaml"
    text = (recipes_dir() / "w4a16-gptq.yaml").read_text()
    theirs.write_text(text.replace("actorder: static", "act_order: static"))
    assert_usage_error(optcli("quantize", "builtin:tiny-llama", "-r", str(theirs), "--out", str(tmp_path / "o")),
                       str(theirs), "GPTQModifier.act_order", "actorder")
    assert not (tmp_path / "o").exists()


def test_corrupt_model_exits_2(tmp_path: Path) -> None:
    from optcli.checkpoints.resolve import resolve_model

    src = resolve_model("builtin:tiny-llama").path
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in src.iterdir():
        data = f.read_bytes()
        (broken / f.name).write_bytes(data[: len(data) // 2] if f.suffix == ".safetensors" else data)
    assert_usage_error(optcli("quantize", str(broken), "-r", "bf16", "--out", str(tmp_path / "o")), "truncated safetensors")


def test_calibration_from_another_tokenizer_is_refused(tmp_path: Path, stories_dir: Path) -> None:
    calib = tmp_path / "calib"
    made = optcli("calibrate", "--model", str(stories_dir), "--source", str(shared_data("tinystories_train_sample.txt")),
                  "--out", str(calib), "--samples", "4", "--seq-len", "64", "--json")
    assert made.returncode == 0, made.stderr
    assert json.loads(made.stdout)["samples"] == 4
    out = tmp_path / "o"
    result = optcli("quantize", "builtin:tiny-llama", "-r", "w4a16-gptq", "--calibration", str(calib), "--out", str(out))
    assert_usage_error(result, "another tokenizer")
    assert not out.exists()


def test_sigkill_leaves_no_artifact_and_the_next_run_succeeds(tmp_path: Path) -> None:
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([OPTCLI, "quantize", "builtin:tiny-llama", "-r", "w4a16-awq", "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".tmp-killed-*")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert proc.poll() is None, "quantize finished before it could be killed"
    time.sleep(3.0)  # inside loading/calibration: the temporary exists, the artifact is not complete
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    result = optcli("quantize", "builtin:tiny-llama", "-r", "w4a16-rtn", "--out", str(out), "--json")
    assert result.returncode == 0, result.stderr
    assert (out / "optcli.json").exists()
    assert not list(tmp_path.glob(".tmp-killed-*"))  # the stale temporary was swept


def test_convert_llama2c_cli(tmp_path: Path) -> None:
    out = tmp_path / "stories"
    ok = optcli("convert", "llama2c", str(shared_data("stories260K.bin")), "--tokenizer",
                str(shared_data("tok512.bin")), "--out", str(out), "--json")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["out"] == str(out)
    truncated = tmp_path / "cut.bin"
    truncated.write_bytes(shared_data("stories260K.bin").read_bytes()[:5000])
    assert_usage_error(optcli("convert", "llama2c", str(truncated), "--tokenizer", str(shared_data("tok512.bin")),
                              "--out", str(tmp_path / "x")), str(truncated))
    assert not (tmp_path / "x").exists()


def test_recipes_list_json() -> None:
    result = optcli("recipes", "list", "--json")
    assert result.returncode == 0
    names = {r["name"] for r in json.loads(result.stdout)["recipes"]}
    assert {"w4a16-gptq", "nf4-bnb", "2of4-w4a16"} <= names
