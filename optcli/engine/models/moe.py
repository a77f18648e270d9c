"""Mixture-of-experts feed-forward: a router picks `top_k` experts per token, each expert a SwiGLU MLP.

Tokens are grouped by expert. On the Triton backend with dense experts, all experts run in one grouped
GEMM launch per projection (`kernels/moe_gemm.py`) over their weights stacked [E, out, in]: gate_up
reads the layer input by token index, down scales each row by its routing weight. A launch per expert
would make a decode step mostly launch overhead and tiny GEMMs. Elsewhere (CPU, quantized experts) each
expert that any token chose runs one GEMM pair per step over exactly its tokens.

The router ("gate") stays a plain unquantized matrix: its logits decide which experts run, so
quantization error there changes the computation itself, and llm-compressor's MoE recipes leave it out
for that reason. Experts are `Dense` layers, so a quantized checkpoint's experts become the format's
QuantLinear like any other linear layer.

Routing follows each family, as transformers computes it (softmax in fp32, then top-k; Mixtral always
renormalises the chosen weights, Qwen2/3-MoE and OLMoE when `norm_topk_prob`), and the per-expert outputs
are summed in expert order in the activation dtype, as transformers' `index_add_` does (on both paths),
so bf16 greedy output matches it too. Qwen2-MoE adds a shared expert every token runs (`SharedExpert`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from optcli.engine.quant.layers import path_counts
from optcli.engine.quant.weights import cat_weights

MOE_ARCHITECTURES = ("MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM", "OlmoeForCausalLM")
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
    shared_intermediate: int = 0  # Qwen2-MoE: a shared expert every token runs, scaled by a sigmoid gate

    @classmethod
    def from_hf(cls, config, arch: str) -> MoESpec | None:
        if arch not in MOE_ARCHITECTURES:
            return None
        layers = config.num_hidden_layers
        if arch == "MixtralForCausalLM":
            return cls(config.num_local_experts, config.num_experts_per_tok, config.intermediate_size, True, True,
                       [True] * layers, "block_sparse_moe.", ("w1", "w3", "w2"))
        if arch in ("Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM"):
            step = getattr(config, "decoder_sparse_step", 1) or 1
            dense_only = set(getattr(config, "mlp_only_layers", None) or [])
            sparse = [i not in dense_only and config.num_experts > 0 and (i + 1) % step == 0 for i in range(layers)]
            return cls(config.num_experts, config.num_experts_per_tok, config.moe_intermediate_size,
                       bool(config.norm_topk_prob), False, sparse, "mlp.", LINEAR_NAMES,
                       getattr(config, "shared_expert_intermediate_size", 0) or 0)
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
        self.shared = SharedExpert(hidden_size, spec.shared_intermediate, linear_cls) if spec.shared_intermediate else None
        self._stacks: tuple[torch.Tensor, ...] | None = None  # expert_stacks(): None undecided, () not dense

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
        if ops.name == "triton" and (stacks := self.expert_stacks(h)) is not None:
            out = grouped_experts(h, weights, ids, stacks, ops)
        else:
            out = self.per_expert(h, weights, ids, ops)
        return out if self.shared is None else out + self.shared(h, ops)  # transformers' order

    def per_expert(self, h: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, ops) -> torch.Tensor:
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

    def expert_stacks(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The experts' weights stacked, gate_up [E, 2I, H] and down [E, H, I], when every expert is a
        plain Dense in h's dtype and device; else None (quantized or oneDNN-packed experts keep the loop).

        Built on first use, then the only copy: each expert's `.weight` becomes a view into its stack, and
        the stacks are a plain attribute, neither parameter nor buffer. So memory holds the experts once,
        `weight_bytes` counts them once (through the views, which tile the stack exactly), and state_dict()
        keeps the per-expert names. On a GPU the first use is the engine's profiling forward, whose peak
        sizes the KV cache and so includes the one group that is briefly held twice. Rebuilt if the
        weights moved: `.to()` swaps each parameter's data, leaving the stack stale."""
        stacks = self._stacks
        if stacks is not None and (not stacks or (stacks[0].data_ptr() == self.gate_up[0].weight.data_ptr()
                                                  and stacks[1].data_ptr() == self.down[0].weight.data_ptr())):
            return stacks or None
        if not all(_plain_dense(layer, h) for layer in (*self.gate_up, *self.down)):
            self._stacks = ()  # decided once: a checked 2E-layer walk every step would cost host time
            return None
        # The engine runs under inference_mode; weights built there would be inference tensors that no
        # later in-place update (a reload) could touch.
        with torch.inference_mode(False), torch.no_grad():
            built = []
            for group in (self.gate_up, self.down):
                stack = torch.stack([layer.weight for layer in group])
                for layer, view in zip(group, stack, strict=True):
                    layer.weight = nn.Parameter(view, requires_grad=False)
                built.append(stack)
        self._stacks = (built[0], built[1])
        return self._stacks

    def load(self, take, has, load_linear, prefix: str) -> None:
        """Take this block's tensors under `prefix` (`<layer>.<spec.prefix>`) through the model's loader."""
        self.gate = nn.Parameter(take(prefix + "gate.weight", dense=True), requires_grad=False)  # model dtype
        self._stacks = None  # expert_stacks() decides again for the new experts
        for e in range(self.spec.num_experts):
            p = f"{prefix}experts.{e}."
            # llm-compressor writes Mixtral's experts under the linearized names it quantized them as
            g, u, d = self.spec.expert_names if has(p + self.spec.expert_names[0] + ".weight") else LINEAR_NAMES
            pair = [take(p + f"{g}.weight", linear=True), take(p + f"{u}.weight", linear=True)]
            load_linear(self.gate_up, str(e), cat_weights(pair))
            load_linear(self.down, str(e), take(p + f"{d}.weight", linear=True))
        if self.shared is not None:
            self.shared.load(take, load_linear, prefix)


class SharedExpert(nn.Module):
    """Qwen2-MoE's shared expert: a SwiGLU MLP every token runs besides its routed experts, its output scaled
    per token by sigmoid(shared_expert_gate(h)). The gate is a one-row matrix kept unquantized like the router
    (quantize/llmcompressor.py keeps it out of every recipe): it decides how much of the expert is used."""

    def __init__(self, hidden_size: int, intermediate: int, linear_cls) -> None:
        super().__init__()
        self.gate = nn.Parameter(torch.empty(1, hidden_size), requires_grad=False)
        self.gate_up = linear_cls(hidden_size, 2 * intermediate)
        self.down = linear_cls(intermediate, hidden_size)

    def forward(self, h: torch.Tensor, ops) -> torch.Tensor:
        y = self.down(ops.silu_mul(self.gate_up(h)))
        return torch.sigmoid(F.linear(h, self.gate)) * y  # in the activation dtype, as transformers

    def load(self, take, load_linear, prefix: str) -> None:
        p = prefix + "shared_expert."
        self.gate = nn.Parameter(take(prefix + "shared_expert_gate.weight", dense=True), requires_grad=False)
        pair = [take(p + "gate_proj.weight", linear=True), take(p + "up_proj.weight", linear=True)]
        load_linear(self, "gate_up", cat_weights(pair))
        load_linear(self, "down", take(p + "down_proj.weight", linear=True))


def _plain_dense(layer: nn.Module, h: torch.Tensor) -> bool:
    """An expert the grouped kernel reads as is: not quantized (QuantLinear has `kind`), not packed into
    oneDNN's layout (CPU fp32 Dense empties `.weight`), no bias, an [out, in] weight like h."""
    w = getattr(layer, "weight", None)
    return (not hasattr(layer, "kind") and getattr(layer, "packed", None) is None
            and getattr(layer, "bias", None) is None and isinstance(w, torch.Tensor) and w.dim() == 2
            and w.numel() > 0 and w.dtype == h.dtype and w.device == h.device)


def grouped_experts(h: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, stacks: tuple[torch.Tensor, torch.Tensor],
                    ops) -> torch.Tensor:
    """All experts as two grouped GEMMs (kernels/moe_gemm.py), summed as SparseMoE.forward's loop sums them."""
    from optcli.engine.kernels.moe_gemm import block_m_for, grouped_gemm, moe_align  # triton is optional

    gate_up, down = stacks
    t, k = ids.shape
    plan = moe_align(ids, gate_up.shape[0], block_m_for(t * k, gate_up.shape[0]))
    act = ops.silu_mul(grouped_gemm(h.contiguous(), gate_up, plan))
    y = grouped_gemm(act, down, plan, row_scale=weights.reshape(-1).contiguous()).view(t, k, down.shape[1])
    if k > 2:  # adds round in the activation dtype: take a token's slots in expert order, as index_add_ does
        y = y.gather(1, ids.argsort(dim=1)[..., None].expand_as(y))
    out = y[:, 0]
    for slot in range(1, k):
        out = out + y[:, slot]
    return out


def moe_summary(model: nn.Module) -> dict | None:
    """What the engine reports about a MoE model's experts: how each expert layer runs (a quantized format
    and path, or dense) and that the router gates are not quantized. None for a dense model."""
    blocks = [m for m in model.modules() if isinstance(m, SparseMoE)]
    if not blocks:
        return None
    experts = path_counts([layer for block in blocks for layer in (*block.gate_up, *block.down)], "dense")
    spec = blocks[0].spec
    summary = {"moe_layers": len(blocks), "num_experts": spec.num_experts, "top_k": spec.top_k,
               "expert_layers": experts, "router_gates": "unquantized"}
    if spec.shared_intermediate:
        shared = [layer for block in blocks for layer in (block.shared.gate_up, block.shared.down)]
        summary["shared_expert_layers"] = path_counts(shared, "dense")
    return summary
