"""One declaration per option: the CLI options of `serve`, `profile` and `roi` are made from the typed
models' field declarations (`config.option`), so a new engine option is one `EngineConfig` field (with its
help, and its `vllm serve` flag where vLLM has one) and nothing else."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Annotated

import pytest
import typer
from typer.main import get_command
from typer.testing import CliRunner

from optcli.bench.args import AccuracyArgs, OutputArgs, TargetArgs
from optcli.bench.workload_flags import WorkloadFlags
from optcli.cli import app
from optcli.cli.flags import declared, with_options
from optcli.config import EngineConfig, option
from optcli.roi.analysis import RoiOptions
from optcli.vllm.argv import VllmOptions, engine_flags, vllm_command


def options_of(command: str) -> dict:
    """{flag: option} of one optcli command, as click parses it (typer's own click copy or click's)."""
    cmd = get_command(app).commands[command]
    return {flag: p for p in cmd.params if p.param_type_name == "option" for flag in p.opts}


@pytest.mark.parametrize("command", ["serve", "profile"])
def test_every_engine_option_is_a_flag_of_serve_and_profile(command: str) -> None:
    flags = options_of(command)
    for f in EngineConfig.cli_fields():
        for flag in f.metadata["flags"]:
            assert flag in flags, (command, flag)
            assert flags[flag].help == f.metadata["help"]
    assert flags["--max-num-seqs"].default == EngineConfig().max_num_seqs
    assert flags["--max-model-len"].default is None  # "not given": vLLM keeps its own


@pytest.mark.parametrize(("command", "groups"), [
    ("profile", (WorkloadFlags, AccuracyArgs, TargetArgs, OutputArgs, EngineConfig)),
    ("roi", (RoiOptions,)),
])
def test_each_declared_field_is_one_option(command: str, groups: tuple) -> None:
    flags = options_of(command)
    declared_flags = [flag for cls in groups for f in declared(cls) for flag in f.metadata["flags"]]
    assert len(declared_flags) == len(set(declared_flags))  # no flag declared twice
    assert set(declared_flags) <= set(flags)


@dataclass(frozen=True)
class WithKvCacheDtype(EngineConfig):
    """What another change adds: one field, with its flag, help and vLLM flag."""

    kv_cache_dtype: str = option("auto", "--kv-cache-dtype", vllm="--kv-cache-dtype", help="KV cache dtype.")


def test_a_new_engine_field_is_all_a_new_option_needs() -> None:
    seen = {}
    demo = typer.Typer()

    @demo.command()
    @with_options(engine=WithKvCacheDtype)
    def run(engine: WithKvCacheDtype, name: Annotated[str, typer.Option("--name")] = "x") -> None:
        seen["engine"] = engine

    result = CliRunner().invoke(demo, ["--kv-cache-dtype", "fp8", "--max-num-seqs", "3", "--name", "y"])
    assert result.exit_code == 0, result.output
    assert seen["engine"] == WithKvCacheDtype(kv_cache_dtype="fp8", max_num_seqs=3)
    flags = engine_flags(seen["engine"])
    assert flags[flags.index("--kv-cache-dtype") + 1] == "fp8"
    assert "--kv-cache-dtype" not in engine_flags(WithKvCacheDtype())  # auto: vLLM's own choice


def test_a_bad_engine_option_is_exit_2_with_one_line() -> None:
    result = CliRunner().invoke(app, ["serve", "builtin:tiny-llama", "--dtype", "float8"])
    assert result.exit_code == 2 and "--dtype must be one of" in result.output
    result = CliRunner().invoke(app, ["profile", "builtin:tiny-llama", "--device", "tpu"])
    assert result.exit_code == 2 and "--device must be auto, cpu or cuda" in result.output


def test_vllm_argv_maps_the_declared_options(tmp_path) -> None:
    config = EngineConfig(dtype="float16", max_num_seqs=8, enforce_eager=True, gpu_memory_utilization=0.5)
    argv = vllm_command("/m", "127.0.0.1", 9000, config, VllmOptions(tensor_parallel_size=2, max_model_len=512),
                        served_model_name="m", executable="vllm")
    pairs = dict(zip(argv[3::2], argv[4::2], strict=False))
    assert argv[:3] == ["vllm", "serve", "/m"] and argv[-1] == "--enforce-eager"
    assert {k: pairs[k] for k in ("--dtype", "--max-num-seqs", "--gpu-memory-utilization", "--max-model-len",
                                  "--tensor-parallel-size", "--served-model-name")} == {
        "--dtype": "float16", "--max-num-seqs": "8", "--gpu-memory-utilization": "0.5", "--max-model-len": "512",
        "--tensor-parallel-size": "2", "--served-model-name": "m"}
    # our engine's own options (the LM head, the device) are not vLLM's: never passed to it
    mapped = {f.name for f in dataclasses.fields(EngineConfig) if f.metadata.get("vllm")}
    assert "lm_head" not in mapped and "device" not in mapped
