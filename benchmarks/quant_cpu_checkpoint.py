"""quant_cpu.py's checkpoints: the seeded random bf16 source (Llama-3.2-1B shape, a small one, or a Qwen3-MoE) and the
artifacts `optcli quantize` makes from it.
"""

from __future__ import annotations

import gc
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from bench_model import LLAMA_3_2_1B as SHAPE_1B

LLAMA_3_2_1B = dict(SHAPE_1B, initializer_range=0.02)  # the shape gpu_check.py measures


SMALL = dict(LLAMA_3_2_1B, num_hidden_layers=2, hidden_size=256, intermediate_size=1024,
             num_attention_heads=4, num_key_value_heads=1, vocab_size=1024)


# --moe: a Qwen3-MoE model (every layer sparse, q/k norms per head, untied head) small enough that building it,
# quantizing it to W4A16 and running bf16 + W4A16 takes about a minute on a 2-core CPU with 24 GiB: 8 layers,
# hidden 1024, 16 heads / 4 KV heads of 64, 32 experts of intermediate 512, top-4 renormalised, vocab 32000.
# 489.4M parameters in all (0.98 GB bf16), 137.1M active per token (embeddings and head included). Every
# linear's in_features (1024 and 512) is a multiple of W4A16's group size 128, so every expert quantizes.
QWEN3_MOE = dict(
    num_hidden_layers=8,
    hidden_size=1024,
    intermediate_size=2048,  # a dense MLP's width: unused, since no layer is in mlp_only_layers
    moe_intermediate_size=512,
    num_experts=32,
    num_experts_per_tok=4,
    norm_topk_prob=True,
    num_attention_heads=16,
    num_key_value_heads=4,
    head_dim=64,
    vocab_size=32000,
    tie_word_embeddings=False,
    max_position_embeddings=2048,
    initializer_range=0.02,
)


# --small --moe: a smoke run of a minute or two; in_features 256 and 128 still divide by 128.
SMALL_MOE = dict(QWEN3_MOE, num_hidden_layers=2, hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
                 num_experts=8, num_experts_per_tok=2, num_attention_heads=4, num_key_value_heads=1, vocab_size=1024)


# format -> (recipe for `optcli quantize`, artifact directory); bf16 is the source checkpoint itself.
W8A8_RTN_RECIPE = """\
name: w8a8-rtn
description: INT8 weights per channel by round to nearest, INT8 activations per token (dynamic). No calibration data.
backend: llmcompressor
scheme: W8A8
ignore: [lm_head]
calibration:
  required: false
llmcompressor:
  quant_stage:
    quant_modifiers:
      QuantizationModifier:
        targets: [Linear]
        scheme: W8A8
"""


T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", flush=True)


def is_moe(shape: dict) -> bool:
    return "num_experts" in shape


def default_workdir(shape: dict, small: bool) -> Path:
    from optcli.config import cache_dir

    full, family = (QWEN3_MOE, "qwen3-moe") if is_moe(shape) else (LLAMA_3_2_1B, "llama")
    name = "qwen3-moe-shape" if is_moe(shape) else "llama-3.2-1b-shape"
    if small:
        name = f"{family}-small-h{shape['hidden_size']}"
    if small or shape["num_hidden_layers"] != full["num_hidden_layers"] or shape["vocab_size"] != full["vocab_size"]:
        name += f"-l{shape['num_hidden_layers']}-v{shape['vocab_size']}"
    return cache_dir() / "bench" / name


def model_classes(shape: dict):
    """(config class, model class) of transformers for a shape: Qwen3-MoE when it has experts, else Llama."""
    import transformers

    if is_moe(shape):
        return transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM
    return transformers.LlamaConfig, transformers.LlamaForCausalLM


def param_counts(shape: dict) -> tuple[int, int]:
    """(total, active per token) parameters of a shape, embeddings and LM head included; equal when dense."""
    h, layers, vocab = shape["hidden_size"], shape["num_hidden_layers"], shape["vocab_size"]
    q = shape["num_attention_heads"] * shape["head_dim"]
    kv = shape["num_key_value_heads"] * shape["head_dim"]
    per_layer = 2 * h * q + 2 * h * kv + 2 * h  # q, o, k, v and the two norms
    if is_moe(shape):
        per_layer += 2 * shape["head_dim"]  # Qwen3's q/k norms per head
        expert = 3 * h * shape["moe_intermediate_size"]
        per_layer += shape["num_experts"] * (h + expert)  # router row and expert per expert
        idle = layers * (shape["num_experts"] - shape["num_experts_per_tok"]) * expert
    else:
        per_layer += 3 * h * shape["intermediate_size"]
        idle = 0
    total = layers * per_layer + h + vocab * h * (1 if shape.get("tie_word_embeddings") else 2)
    return total, total - idle


def build_source(out: Path, shape: dict, seed: int) -> bool:
    """The seeded random bf16 checkpoint plus the builtin tokenizer; False when a matching one is there."""
    stamp = {"shape": shape, "seed": seed}
    marker = out / "bench-shape.json"
    if marker.is_file() and json.loads(marker.read_text()) == stamp:
        return False
    from transformers import GenerationConfig

    from optcli.builtin import model_dir

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    tok_dir = model_dir("tiny-llama")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tok_dir / name, out / name)
    tok_cfg = json.loads((tok_dir / "config.json").read_text())
    bos, eos = tok_cfg.get("bos_token_id", 1), tok_cfg.get("eos_token_id", 2)
    config_cls, model_cls = model_classes(shape)
    config = config_cls(bos_token_id=bos, eos_token_id=eos, pad_token_id=0, **shape)
    torch.manual_seed(seed)
    model = model_cls._from_config(config, dtype=torch.bfloat16).eval()
    model.save_pretrained(out, safe_serialization=True)
    GenerationConfig(bos_token_id=bos, eos_token_id=eos).save_pretrained(out)
    params = sum(p.numel() for p in model.parameters())
    if params != param_counts(shape)[0]:
        raise RuntimeError(f"{model_cls.__name__}: {params} parameters, param_counts() says {param_counts(shape)[0]}")
    del model
    gc.collect()
    marker.write_text(json.dumps(stamp))  # written last: its presence means the checkpoint is complete
    log(f"built {out} ({model_cls.__name__}): {params / 1e6:.1f}M parameters, bf16")
    return True


MIXED_W8_LAYERS = 2  # W8A16 q/k/v in this many first layers (where tiny-llama's auto:4.5 put its 8-bit layers)


def mixed_recipe(layers: int) -> str:
    """The kind of layout `--recipe auto:4.5` gives a model whose widths divide 128 (tiny-llama's: 14 layers
    at 4-bit zero point group 32, 5 at group 64, 6 at group 128, 3 at W8A16): W8A16 q/k/v in the first
    MIXED_W8_LAYERS layers, otherwise attention at zero point g128, gate/up at zero point g64, down_proj at
    zero point g32 (~4.43 bits per weight on the 1B shape). Round to nearest: speed depends on the layout,
    not on how the integers were chosen, and random weights have no sensitivity to rank."""
    import yaml

    def zp(group: int) -> dict:
        return {"num_bits": 4, "type": "int", "symmetric": False, "strategy": "group", "group_size": group}

    names = [f"model.layers.{i}.{m}" for i in range(layers) for m in
             ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
              "mlp.up_proj", "mlp.down_proj")]
    w8 = [n for n in names if int(n.split(".")[2]) < MIXED_W8_LAYERS and n.endswith(("q_proj", "k_proj", "v_proj"))]
    rest = [n for n in names if n not in w8]
    groups = {"group_w8a16": {"targets": w8, "weights": {"num_bits": 8, "type": "int", "symmetric": True,
                                                         "strategy": "channel"}},
              "group_zp128": {"targets": [n for n in rest if "self_attn" in n], "weights": zp(128)},
              "group_zp64": {"targets": [n for n in rest if n.endswith(("gate_proj", "up_proj"))], "weights": zp(64)},
              "group_zp32": {"targets": [n for n in rest if n.endswith("down_proj")], "weights": zp(32)}}
    return yaml.safe_dump({"name": "mixed-rtn", "description": "auto:4.5's kind of layout: W8A16 q/k/v in the first "
                           f"{MIXED_W8_LAYERS} layers, 4-bit zero point groups 128/64/32 elsewhere, round to nearest.",
                           "backend": "llmcompressor", "scheme": "mixed", "ignore": ["lm_head"],
                           "calibration": {"required": False},
                           "llmcompressor": {"quant_stage": {"quant_modifiers": {
                               "QuantizationModifier": {"config_groups": groups}}}}}, sort_keys=False)


def recipe_path(workdir: Path, recipe: str) -> str:
    """A builtin recipe's name, or the path of the W8A8 RTN (or mixed) recipe written into the workdir."""
    if recipe == "mixed-rtn":
        layers = json.loads((workdir / "bf16" / "config.json").read_text())["num_hidden_layers"]
        path = workdir / "mixed-rtn.yaml"
        path.write_text(mixed_recipe(layers))
        return str(path)
    if recipe != "w8a8-rtn":
        return recipe
    path = workdir / "w8a8-rtn.yaml"
    path.write_text(W8A8_RTN_RECIPE)
    return str(path)


def make_artifact(workdir: Path, source: Path, recipe: str, rebuild: bool) -> Path:
    """`optcli quantize` in a subprocess; an existing artifact (its manifest present) is reused."""
    out = workdir / recipe
    if (out / "optcli.json").is_file() and not rebuild:
        log(f"reusing {out}")
        return out
    cmd = [sys.executable, "-m", "optcli.cli", "quantize", str(source), "--recipe", recipe_path(workdir, recipe),
           "--out", str(out), "--device", "cpu", "--force", "--json"]
    log(f"quantizing: {' '.join(cmd[1:])}")
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.stderr.write(done.stderr[-4000:])
        raise RuntimeError(f"optcli quantize --recipe {recipe} failed (exit {done.returncode})")
    log(f"quantized {recipe} in {time.perf_counter() - start:.0f}s")
    return out
