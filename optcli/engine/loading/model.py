"""MODEL spec → our forward (quantized weights kept quantized), the tokenizer, and the stop token ids."""

from __future__ import annotations

import torch

from optcli.checkpoints.resolve import resolve_model
from optcli.config import EngineConfig
from optcli.engine.loading.kv_scales import read_calibrated_kv
from optcli.engine.loading.placement import checkpoint_dtype_of, resolve_device, resolve_dtype
from optcli.engine.loading.state_dict import load_state_dict, text_decoder_weights
from optcli.engine.models import SUPPORTED_ARCHITECTURES, TEXT_DECODERS, LlamaForCausalLM, ModelConfig
from optcli.engine.quant.load_time_rounding import quantize_state_dict
from optcli.errors import UsageError
from optcli.util.huge_pages import place_weights


def load_engine_model(spec: str, config: EngineConfig):
    """(model, tokenizer, eos ids, resolved config, dtype reason). `config.device`/`dtype` may be "auto":
    the dtype needs the checkpoint's own, so it is resolved here, between reading the config and
    the weights. Quantized weights stay quantized (run by `quant/linear.py`) unless `dequantize`."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig


    path = resolve_model(spec).path
    hf_config = AutoConfig.from_pretrained(path, trust_remote_code=config.trust_remote_code)
    arch = (getattr(hf_config, "architectures", None) or ["unknown"])[0]
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UsageError(f"{path}: architecture {arch} is not supported by the built-in engine "
                         f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)}); run it with `optcli serve --engine vllm` or "
                         "`optcli profile --engine vllm`")
    device = resolve_device(config.device)
    chosen_by_us = config.dtype == "auto"
    dtype_name, reason = resolve_dtype(config.dtype, device, checkpoint_dtype_of(hf_config))
    config = config.with_options(device=device, dtype=dtype_name)
    dtype = getattr(torch, dtype_name)
    cfg = ModelConfig.from_hf(hf_config)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model = model.to_empty(device=device).to(dtype)
    model.rotary = type(model.rotary)(cfg).to(device)  # buffers computed for real, not on meta
    # the checkpoint's own dtype: a bf16 weight may stay bf16 in an fp32 CPU model (models/llama.py Dense)
    state = load_state_dict(path, dtype=torch.float32 if config.quantization else None,
                            keep_quantized=not config.dequantize)
    if arch in TEXT_DECODERS:  # a multimodal checkpoint: its text decoder's weights, under a causal LM's names
        state = text_decoder_weights(state)
    if config.quantization:  # online RTN quantization of a dense checkpoint (quant/load_time_rounding.py)
        state = quantize_state_dict(state, config.quantization, device)
    # With dtype auto on a CPU, quantized layers may compute in bf16 (quant/linear.py says why)
    compute_dtypes = (torch.bfloat16,) if chosen_by_us and device == "cpu" else ()
    model.load_hf_state_dict(state, compute_dtypes, config.lm_head)
    del state  # the checkpoint's own copies, before placement below copies tensor by tensor
    model.eval()
    if device == "cpu":  # decode streams every weight once a step: 2 MiB pages spare a page walk every 4 KiB
        place_weights(model)
    model.calibrated_kv = read_calibrated_kv(path)  # llm-compressor's KV scales, or None (engine/kv_storage.py)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=config.trust_remote_code)
    eos: set[int] = set()
    try:
        gen = GenerationConfig.from_pretrained(path)
        eos.update(_as_list(gen.eos_token_id))
    except OSError:
        pass
    eos.update(_as_list(getattr(hf_config, "eos_token_id", None)))
    if tokenizer.eos_token_id is not None:
        eos.add(tokenizer.eos_token_id)
    return model, tokenizer, eos, config, reason


def _as_list(value) -> list[int]:
    if value is None:
        return []
    return [value] if isinstance(value, int) else list(value)
