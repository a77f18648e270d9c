"""Mixture-of-experts feed-forward: a router picks `top_k` experts per token, each expert a SwiGLU MLP.

Tokens are grouped by expert, so each expert that any token chose runs one GEMM pair per step over
exactly its tokens (on a GPU too: there is no fused-experts kernel yet). The router ("gate") stays a plain unquantized matrix: its logits decide which
experts run, so quantization error there changes the computation itself, and llm-compressor's MoE
recipes leave it out for that reason. Experts are `Dense` layers, so a quantized checkpoint's experts
become the format's QuantLinear like any other linear layer.

Routing follows each family, as transformers computes it (softmax in fp32, then top-k; Mixtral always
renormalises the chosen weights, Qwen3-MoE and OLMoE when `norm_topk_prob`), and the per-expert outputs
are summed in expert order in the activation dtype, as transformers' `index_add_` does, so bf16
greedy output matches it too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from optcli.engine.quant.weights import cat_weights

MOE_ARCHITECTURES = ("MixtralForCausalLM", "Qwen3MoeForCausalLM", "OlmoeForCausalLM")
LINEAR_NAMES = ("gate_proj", "up_proj", "down_proj")


@dataclass
class MoESpec:
    """What the MoE block needs from an HF config."""

    num_experts: int
    top_k: int
    expert_intermediate_size: int
    renormalize: bool
    weights_in_fp32: bool  # Mixtral scales expert outputs by fp32 weights; the others cast them first
    sparse_layers: list[bool]  # per layer: MoE (True) or a dense MLP (Qwen3-MoE's mlp_only_layers)
    prefix: str  # the block's name under a layer in the checkpoint
    expert_names: tuple[str, str, str]  # gate, up, down projection names inside experts.{e}.

    @classmethod
    def from_hf(cls, config, arch: str) -> MoESpec | None:
        if arch not in MOE_ARCHITECTURES:
            return None
        layers = config.num_hidden_layers
        if arch == "MixtralForCausalLM":
            return cls(config.num_local_experts, config.num_experts_per_tok, config.intermediate_size, True, True,
                       [True] * layers, "block_sparse_moe.", ("w1", "w3", "w2"))
        if arch == "Qwen3MoeForCausalLM":
            step = getattr(config, "decoder_sparse_step", 1) or 1
            dense_only = set(getattr(config, "mlp_only_layers", None) or [])
            sparse = [i not in dense_only and config.num_experts > 0 and (i + 1) % step == 0 for i in range(layers)]
            return cls(config.num_experts, config.num_experts_per_tok, config.moe_intermediate_size,
                       bool(config.norm_topk_prob), False, sparse, "mlp.", LINEAR_NAMES)
        return cls(config.num_experts, config.num_experts_per_tok, config.intermediate_size,
                   bool(config.norm_topk_prob), False, [True] * layers, "mlp.", LINEAR_NAMES)


class SparseMoE(nn.Module):
    def __init__(self, hidden_size: int, spec: MoESpec, linear_cls) -> None:
        super().__init__()
        self.spec = spec
        self.gate = nn.Parameter(torch.empty(spec.num_experts, hidden_size), requires_grad=False)
        inter = spec.expert_intermediate_size
        self.gate_up = nn.ModuleList(linear_cls(hidden_size, 2 * inter) for _ in range(spec.num_experts))
        self.down = nn.ModuleList(linear_cls(inter, hidden_size) for _ in range(spec.num_experts))

    def route(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights [T, k], expert ids [T, k]) per token."""
        logits = F.linear(h, self.gate)
        probs = torch.softmax(logits.float(), dim=-1)
        weights, ids = torch.topk(probs, self.spec.top_k, dim=-1)
        if self.spec.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return (weights if self.spec.weights_in_fp32 else weights.to(h.dtype)), ids

    def forward(self, h: torch.Tensor, ops) -> torch.Tensor:
        weights, ids = self.route(h)
        out = torch.zeros_like(h)
        # One sort groups the (token, slot) pairs by expert; each expert then runs over its rows only.
        flat = ids.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.spec.num_experts).tolist()
        token_of = order // self.spec.top_k
        weight_of = weights.reshape(-1)[order]
        start = 0
        for expert, count in enumerate(counts):
            if count == 0:
                continue
            rows = token_of[start:start + count]
            act = ops.silu_mul(self.gate_up[expert](h[rows]))
            y = self.down[expert](act) * weight_of[start:start + count, None]
            out.index_add_(0, rows, y.to(out.dtype))
            start += count
        return out

    def load(self, take, has, load_linear, prefix: str) -> None:
        """Take this block's tensors under `prefix` (`<layer>.<spec.prefix>`) through the model's loader."""
        self.gate = nn.Parameter(take(prefix + "gate.weight", dense=True), requires_grad=False)  # model dtype
        for e in range(self.spec.num_experts):
            p = f"{prefix}experts.{e}."
            # llm-compressor writes Mixtral's experts under the linearized names it quantized them as
            g, u, d = self.spec.expert_names if has(p + self.spec.expert_names[0] + ".weight") else LINEAR_NAMES
            pair = [take(p + f"{g}.weight", linear=True), take(p + f"{u}.weight", linear=True)]
            load_linear(self.gate_up, str(e), cat_weights(pair))
            load_linear(self.down, str(e), take(p + f"{d}.weight", linear=True))


def moe_summary(model: nn.Module) -> dict | None:
    """What the engine reports about a MoE model's experts: how each expert layer runs (a quantized format
    and path, or dense) and that the router gates are not quantized. None for a dense model."""
    blocks = [m for m in model.modules() if isinstance(m, SparseMoE)]
    if not blocks:
        return None
    experts: dict[str, int] = {}
    for block in blocks:
        for layer in (*block.gate_up, *block.down):
            key = f"{layer.kind}/{layer.mode}" if hasattr(layer, "kind") else "dense"
            experts[key] = experts.get(key, 0) + 1
    spec = blocks[0].spec
    return {"moe_layers": len(blocks), "num_experts": spec.num_experts, "top_k": spec.top_k,
            "expert_layers": experts, "router_gates": "unquantized"}
