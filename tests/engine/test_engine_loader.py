"""Dequantize-on-load: every recipe's artifact, loaded dense, must be the model transformers runs.

Both sides run in float32 where transformers allows it, so W4A16 and NF4 must agree exactly (up to
float summation order). W8A8, FP8 and LLM.int8 quantize activations at run time in transformers
while our dense load does not, so for those we compare the dequantized weights instead.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from optcli.engine.loading.state_dict import load_dense_state_dict
from optcli.errors import UsageError

LOGIT_RECIPES = ["bf16", "w4a16-rtn", "w4a16-gptq", "2of4-w4a16", "nf4-bnb"]
WEIGHT_RECIPES = ["w8a8-int8", "fp8-dynamic"]
ALL_RECIPES = [*LOGIT_RECIPES, *WEIGHT_RECIPES, "int8-bnb"]


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """Quantize the builtin model once per recipe, calibrating on a small set (8 x 128 tokens)."""
    from transformers import AutoTokenizer

    from optcli.calibration.dataset import default_calibration_set, save_calibration_set
    from optcli.checkpoints.resolve import resolve_model
    from optcli.quantize.pipeline import quantize

    root = tmp_path_factory.mktemp("loader")
    tokenizer = AutoTokenizer.from_pretrained(resolve_model("builtin:tiny-llama").path)
    calib = save_calibration_set(default_calibration_set(tokenizer, 8, 128), root / "calib")
    made: dict[str, Path] = {}

    def get(recipe: str) -> Path:
        if recipe not in made:
            quantize("builtin:tiny-llama", recipe, root / recipe, calibration=calib, device="cpu")
            made[recipe] = root / recipe
        return made[recipe]

    return get


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(3, 1024, (4, 48), generator=torch.Generator().manual_seed(0))


def dense_model(directory: Path) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """A plain float32 Llama built from the config alone, with our dense state dict loaded."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = json.loads((directory / "config.json").read_text())
    config.pop("quantization_config", None)
    state = load_dense_state_dict(directory)
    assert all(t.dtype == torch.float32 for t in state.values())
    model = LlamaForCausalLM(LlamaConfig(**config)).float().eval()
    result = model.load_state_dict(state, strict=False)
    assert not result.unexpected_keys and set(result.missing_keys) <= {"lm_head.weight"}, result
    model.tie_weights()
    return model, state


def transformers_model(directory: Path) -> torch.nn.Module:
    """transformers' own loader, in float32 (NF4: dequantize in fp32, skip the bf16 CPU kernel)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, device_map="cpu", dtype=torch.float32).eval()
    for module in model.modules():
        if type(module).__name__ == "Linear4bit":
            module.compute_dtype, module.compute_type_is_set = torch.float32, True
            module.support_avx512bf16_for_cpu = False
            module.weight.quant_state.dtype = torch.float32
    return model


def test_only_model_tensors_come_back(artifact: Callable[[str], Path]) -> None:
    plain = load_dense_state_dict(artifact("bf16"))
    assert "lm_head.weight" not in plain  # tied in config: not invented
    assert load_dense_state_dict(artifact("bf16"), torch.bfloat16)["model.norm.weight"].dtype == torch.bfloat16
    for recipe in ALL_RECIPES[1:]:
        state = load_dense_state_dict(artifact(recipe))
        assert state.keys() == plain.keys(), recipe  # no scales, zero points, absmax, SCB, ...
        assert all(state[k].shape == plain[k].shape for k in plain), recipe


@pytest.mark.parametrize("recipe", LOGIT_RECIPES)
def test_logits_match_transformers(artifact: Callable[[str], Path], ids: torch.Tensor, recipe: str) -> None:
    directory = artifact(recipe)
    ours, _ = dense_model(directory)
    theirs = transformers_model(directory)
    with torch.no_grad():
        a, b = ours(ids).logits, theirs(ids).logits.float()
    assert (a - b).abs().max() <= 1e-4 * a.abs().max(), (a - b).abs().max()
    assert (a.argmax(-1) == b.argmax(-1)).all()


@pytest.mark.parametrize("recipe", WEIGHT_RECIPES)
def test_weights_match_transformers_decompression(
    artifact: Callable[[str], Path], ids: torch.Tensor, recipe: str
) -> None:
    directory = artifact(recipe)
    _, state = dense_model(directory)
    theirs = transformers_model(directory)
    with torch.no_grad():
        theirs(ids)  # compressed-tensors decompresses on the first forward
    their_state = theirs.state_dict()
    quantized = [k for k in state if k.endswith("proj.weight")]
    assert len(quantized) == 28
    for name in state:
        torch.testing.assert_close(state[name], their_state[name].float(), rtol=0, atol=1e-6, msg=name)


def test_int8_bnb_weights_match_llm_int8_layers(artifact: Callable[[str], Path]) -> None:
    """LLM.int8 layers fed the identity matrix return their effective weight (identity rows quantize exactly)."""
    directory = artifact("int8-bnb")
    _, state = dense_model(directory)
    theirs = transformers_model(directory)
    probed = 0
    with torch.no_grad():
        for name, module in theirs.named_modules():
            if type(module).__name__ == "Linear8bitLt":
                weight = module(torch.eye(module.in_features)).float().T
                ref = state[f"{name}.weight"]
                torch.testing.assert_close(weight, ref, rtol=1e-3, atol=1e-4 * ref.abs().max().item(), msg=name)
                probed += 1
    assert probed == 28


def test_untied_lm_head_is_kept_and_shards_are_read(artifact: Callable[[str], Path], tmp_path: Path) -> None:
    source = artifact("w4a16-rtn")
    tensors = load_file(source / "model.safetensors")
    names = sorted(tensors)
    shard_dir = tmp_path / "sharded"
    shutil.copytree(source, shard_dir, ignore=shutil.ignore_patterns("*.safetensors"))
    lm_head = torch.randn(1024, 256).to(torch.bfloat16)
    shards = {
        "model-00001-of-00002.safetensors": names[: len(names) // 2],
        "model-00002-of-00002.safetensors": names[len(names) // 2 :],
    }
    for file, part in shards.items():  # the shard boundary splits some weight_packed from its scale
        save_file({n: tensors[n] for n in part}, shard_dir / file, metadata={"format": "pt"})
    save_file({"lm_head.weight": lm_head}, shard_dir / "extra.safetensors", metadata={"format": "pt"})
    weight_map = {n: f for f, part in shards.items() for n in part} | {"lm_head.weight": "extra.safetensors"}
    (shard_dir / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    state = load_dense_state_dict(shard_dir)
    expected = load_dense_state_dict(source)
    assert torch.equal(state.pop("lm_head.weight"), lm_head.float())
    assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in expected)


def _copy(source: Path, dest: Path) -> Path:
    shutil.copytree(source, dest)
    return dest


def test_usage_errors(artifact: Callable[[str], Path], tmp_path: Path) -> None:
    rtn = artifact("w4a16-rtn")
    no_weights = _copy(rtn, tmp_path / "none")
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(UsageError, match=r"no \*\.safetensors"):
        load_dense_state_dict(no_weights)

    def edited(name: str, quantization_config: dict) -> Path:
        directory = _copy(rtn, tmp_path / name)
        config = json.loads((directory / "config.json").read_text())
        config["quantization_config"] = quantization_config
        (directory / "config.json").write_text(json.dumps(config))
        return directory

    qconfig = json.loads((rtn / "config.json").read_text())["quantization_config"]
    cases = [
        (
            {"quant_method": "gptq", "bits": 4},
            r"quant_method 'gptq' "
            r"\(supported: none, compressed-tensors, bitsandbytes\)",
        ),
        (qconfig | {"sparsity_config": {"format": "sparse-24-bitmask"}}, r"sparsity format 'sparse-24-bitmask'"),
    ]
    for i, (quantization_config, message) in enumerate(cases):
        with pytest.raises(UsageError, match=r"config\.json: cannot dequantize .*" + message):
            load_dense_state_dict(edited(f"config{i}", quantization_config))
    # A packed module the config does not cover must not pass as a weight.
    uncovered = edited("uncovered", qconfig | {"ignore": ["lm_head", "model.layers.0.mlp.up_proj"]})
    with pytest.raises(UsageError, match=r"up_proj\.weight_packed' is still quantized \(torch\.int32\)"):
        load_dense_state_dict(uncovered)

    for recipe in ("w4a16-rtn", "nf4-bnb"):
        truncated = _copy(artifact(recipe), tmp_path / f"trunc-{recipe}")
        data = (truncated / "model.safetensors").read_bytes()
        (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
        with pytest.raises(UsageError, match=r"model\.safetensors: corrupt or truncated"):
            load_dense_state_dict(truncated)

    bad_config = _copy(rtn, tmp_path / "badconfig")
    (bad_config / "config.json").write_text("{not json")
    with pytest.raises(UsageError, match=r"config\.json: unreadable"):
        load_dense_state_dict(bad_config)

    dropped = [
        ("w4a16-rtn", "weight_scale"),
        ("fp8-dynamic", "weight_scale"),
        ("nf4-bnb", "weight.absmax"),
        ("int8-bnb", "weight"),
    ]
    for recipe, drop in dropped:
        broken = _copy(artifact(recipe), tmp_path / f"drop-{recipe}")
        tensors = load_file(broken / "model.safetensors")
        del tensors[f"model.layers.0.mlp.up_proj.{drop}"]
        save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
        with pytest.raises(UsageError, match=r"model\.safetensors: ") as info:
            load_dense_state_dict(broken)
        assert "\n" not in str(info.value)

    sharded = _copy(rtn, tmp_path / "lost-shard")
    index = {"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(UsageError, match=r"model-00002-of-00002\.safetensors: shard listed"):
        load_dense_state_dict(sharded)
