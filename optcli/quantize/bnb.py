"""bitsandbytes backend: NF4/FP4 4-bit and LLM.int8().

transformers quantizes on load through BitsAndBytesConfig and serializes the packed weights
with their quantization state, so the artifact reloads in plain transformers.
"""

from __future__ import annotations

from typing import Any

import torch

from optcli.errors import UsageError

# bitsandbytes' CPU 4-bit kernel repacks weights in blocks of 32 output rows, with one scale per
# 64 inputs of a row, and fails on any other shape ("N must be divisible by block_n"); such layers
# stay unquantized.
_CPU_4BIT_BLOCK_N = 32
_4BIT_BLOCKSIZE = 64


def unpackable_4bit_layers(source_path, trust_remote_code: bool = False) -> dict[str, str]:
    """Linear layers bitsandbytes can't run in 4 bits on CPU, found on a weightless copy of the model."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(source_path, trust_remote_code=trust_remote_code)
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return {
        name: f"skipped ({module.out_features}x{module.in_features} is not {_CPU_4BIT_BLOCK_N}x{_4BIT_BLOCKSIZE}"
        "-blockable: bitsandbytes' CPU kernel cannot run it; kept unquantized)"
        for name, module in skeleton.named_modules()
        if isinstance(module, torch.nn.Linear)
        and (module.out_features % _CPU_4BIT_BLOCK_N or module.in_features % _4BIT_BLOCKSIZE)
    }


def refuse_experts(source_path, recipe, trust_remote_code: bool = False) -> None:
    """A mixture-of-experts model is exit 2: bitsandbytes replaces nn.Linear layers only, and transformers
    holds the experts as fused 3-D tensors, so the artifact would keep every expert (most of the weights)
    16-bit while calling itself 4-bit."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(source_path, trust_remote_code=trust_remote_code)
    config = getattr(config, "text_config", None) or config
    experts = getattr(config, "num_local_experts", 0) or getattr(config, "num_experts", 0)
    if experts:
        arch = (getattr(config, "architectures", None) or [type(config).__name__])[0]
        raise UsageError(f"recipe {recipe.name}: {arch} is a mixture-of-experts model ({experts} experts a layer), "
                         "whose experts bitsandbytes cannot quantize (it replaces nn.Linear layers only); use an "
                         "llm-compressor recipe such as w4a16-rtn, w4a16-gptq, fp8-dynamic or w8a8-int8")


def bnb_config(recipe, extra_skip=()):
    from transformers import BitsAndBytesConfig

    opts = recipe.bnb
    skip = list(recipe.ignore) + list(extra_skip)
    if opts.quant_type == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=opts.int8_threshold, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=opts.quant_type,
        bnb_4bit_use_double_quant=opts.double_quant,
        bnb_4bit_compute_dtype=getattr(torch, opts.compute_dtype),
        llm_int8_skip_modules=skip,
    )


def quantize_bnb(source_path, recipe, device: str, trust_remote_code: bool = False):
    """Load the source already quantized (bitsandbytes quantizes while loading)."""
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM, AutoTokenizer

    refuse_experts(source_path, recipe, trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(source_path, trust_remote_code=trust_remote_code)
    unpackable = {} if recipe.bnb.quant_type == "int8" else unpackable_4bit_layers(source_path, trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(
        source_path,
        quantization_config=bnb_config(recipe, unpackable),
        device_map=device,
        dtype=getattr(torch, recipe.dtype),
        use_safetensors=True,
        trust_remote_code=trust_remote_code,
    )
    kind = "nf4" if recipe.bnb.quant_type == "nf4" else recipe.bnb.quant_type
    layers: dict[str, Any] = {}
    for name, module in model.named_modules():
        if isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)):
            layers[name] = {"scheme": kind if isinstance(module, bnb.nn.Linear4bit) else "int8 (LLM.int8)"}
        elif isinstance(module, torch.nn.Linear):
            layers[name] = {"scheme": unpackable.get(name, "skipped (ignore list)")}
    return model.eval(), tokenizer, layers
