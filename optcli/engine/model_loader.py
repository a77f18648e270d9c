"""MODEL spec → our forward (quantized weights kept quantized), the tokenizer, and the stop token ids."""

from __future__ import annotations

import torch

from optcli.engine.models import SUPPORTED_ARCHITECTURES, LlamaForCausalLM, ModelConfig
from optcli.errors import UsageError


def load_engine_model(spec: str, device: str, dtype: torch.dtype, trust_remote_code: bool = False,
                      dequantize: bool = False, quantization: str | None = None):
    """Quantized weights stay quantized (run by `quant/linear.py`) unless `dequantize` asks for dense ones."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    from optcli.engine.loader import load_state_dict
    from optcli.models import resolve_model

    path = resolve_model(spec).path
    hf_config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    arch = (getattr(hf_config, "architectures", None) or ["unknown"])[0]
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UsageError(f"{path}: architecture {arch} is not supported by the built-in engine "
                         f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)}); try --engine vllm")
    cfg = ModelConfig.from_hf(hf_config)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model = model.to_empty(device=device).to(dtype)
    model.rotary = type(model.rotary)(cfg).to(device)  # buffers computed for real, not on meta
    state = load_state_dict(path, dtype=torch.float32, keep_quantized=not dequantize)
    if quantization:  # online RTN quantization of a dense checkpoint (quant/online.py)
        from optcli.engine.quant.online import quantize_state_dict

        state = quantize_state_dict(state, quantization, device)
    model.load_hf_state_dict(state)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    eos: set[int] = set()
    try:
        gen = GenerationConfig.from_pretrained(path)
        eos.update(_as_list(gen.eos_token_id))
    except OSError:
        pass
    eos.update(_as_list(getattr(hf_config, "eos_token_id", None)))
    if tokenizer.eos_token_id is not None:
        eos.add(tokenizer.eos_token_id)
    return model, tokenizer, hf_config, eos


def _as_list(value) -> list[int]:
    if value is None:
        return []
    return [value] if isinstance(value, int) else list(value)
