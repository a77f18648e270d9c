"""The decoder forward over a paged KV cache, for every family the engine runs: Llama, Mistral, Qwen2
(qkv bias), Qwen3 (q/k norm), Phi-3 (fused checkpoint), Gemma 2/3 (sandwich norms, soft-capping, scaled
embeddings) and the MoE families (moe.py), each detail switched by `ModelConfig` (config.py).

One flat batch of tokens from many sequences goes through every matmul together; only attention
looks at sequences separately, through the step's metadata (`meta.attend`, see engine/attention/cpu.py
for the CPU gather path and engine/attention/triton.py for the Triton kernels). q/k/v and gate/up are fused into one
matmul each at load time. Numerics follow transformers (RMSNorm in fp32, RoPE tables in fp32) so
greedy decoding matches it token for token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from optcli.engine.kernels import cpu_amx, cpu_lowbit
from optcli.engine.kernels.dense_gemm import dense_linear, onednn_linear_available
from optcli.engine.models.config import SUPPORTED_ARCHITECTURES, ModelConfig
from optcli.engine.models.layer_ops import TorchOps
from optcli.engine.models.moe import SparseMoE
from optcli.engine.models.rotary import LayerRotary, RotaryEmbedding
from optcli.engine.quant.cpu_choice import CpuPaths
from optcli.engine.quant.cpu_kernels import LinearSpec
from optcli.engine.quant.layers import make_quant_linear
from optcli.engine.quant.weights import Int8Weight, cat_weights, is_quantized

__all__ = ["SUPPORTED_ARCHITECTURES", "LlamaForCausalLM", "ModelConfig"]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return TorchOps.rms_norm(x, self.weight, self.eps)[0]




class Dense(CpuPaths, nn.Module):
    """A linear layer. On CPU its kernel per batch-size bucket follows `quant/cpu_choice.py`'s rules: an fp32
    weight is packed once into oneDNN's blocked layout (the path torch.compile's CPU backend uses: 1.4-3.5x
    F.linear (MKL) at batch sizes 1-2048), and a bf16 weight runs our widening kernels at few rows (each bf16
    value widened exactly to fp32 in registers before an fp32 FMA, `kernels/cpu_lowbit.c`) and, in a bf16
    model on a CPU with native bf16, torch's bf16 GEMM (oneDNN) for batched steps. Elsewhere F.linear.

    A bf16 checkpoint's weight on a CPU running fp32 (no native bf16, or `--dtype float32`) stays bf16
    (`keeps_bf16`): half the bytes, and exactly the same fp32 math."""

    input_quant = None  # dense input (see QuantLinear.input_quant)

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.packed: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.plan is None:
            return F.linear(x, self.weight, self.bias) if self.packed is None else self._onednn(x)
        n, k = self.weight_shape
        y = self.cpu_matmul(x if x.dim() == 2 else x.reshape(-1, k))  # the engine's flat batch: no reshapes
        if self.bias is not None:
            y = y + self.bias
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], n)

    def _plan(self, act_dtype: torch.dtype) -> None:
        """Decide this layer's CPU kernels (a CUDA layer has none: F.linear)."""
        w = self.weight
        if w.device.type != "cpu":
            self.plan = None
            return
        self.weight_shape = (w.shape[0], w.shape[1]) if self.packed is None else self.weight_shape
        fmt = "bf16" if w.dtype == torch.bfloat16 else "dense"
        n, k = self.weight_shape
        self.set_cpu_plan(LinearSpec(fmt, n, k, act_dtype, act_dtype == torch.bfloat16))

    # the kernels (cpu_kernels.py names them); each takes and returns a 2-D batch, bias added by forward
    def _bf16_dot(self, x: torch.Tensor) -> torch.Tensor:
        y = cpu_lowbit.bf16_gemm(x, self.weight)
        return y if x.dtype == torch.float32 else y.to(x.dtype)

    def _bf16_dpbf16(self, x: torch.Tensor) -> torch.Tensor:
        return cpu_amx.vnni_bf16_gemm(x, self.weight).to(x.dtype)

    def _bf16_panels(self, x: torch.Tensor) -> torch.Tensor:
        return cpu_lowbit.bf16_gemm(x, self.weight, panels=True).to(x.dtype)

    def _bf16_onednn(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)

    def _bf16_widen(self, x: torch.Tensor) -> torch.Tensor:
        return dense_linear(x.float(), self.weight.float()).to(x.dtype)

    def _onednn(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")
        return dense_linear(x, self.weight)

    def _torch_linear(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)

    @staticmethod
    def keeps_bf16(weight: torch.Tensor, dtype: torch.dtype) -> bool:
        """Whether a checkpoint weight is held bf16 in a `dtype` model: bf16 values, an fp32 model on a
        CPU, and the AVX2 kernels built (without them the widening per call would cost every step)."""
        return (weight.dtype == torch.bfloat16 and dtype == torch.float32 and weight.device.type == "cpu"
                and cpu_lowbit.library() is not None)

    def tie(self, weight: nn.Parameter, act_dtype: torch.dtype) -> None:
        """Compute from another module's weight (a tied embedding): one copy in memory, unpacked, since
        an embedding lookup cannot read oneDNN's opaque blocked layout. oneDNN still runs an fp32 GEMM
        (`dense_linear`): on the 128256 x 2048 head, 36 vs 67 ms at one row, 267 vs 770 at 64."""
        self.weight, self.packed = weight, None
        self._plan(act_dtype)

    def load(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        """Take an HF-layout [out, in] weight (and pack it where that pays). A weight in another dtype
        than the module's is held as given: the loader made that choice (`keeps_bf16`)."""
        act_dtype = self.weight.dtype
        if bias is not None:
            self.bias.copy_(bias)
        if weight.dtype != self.weight.dtype:
            self.weight = nn.Parameter(weight.contiguous(), requires_grad=False)
            self._plan(act_dtype)
            return
        self.weight.copy_(weight)
        self.weight_shape = tuple(self.weight.shape)
        if self.weight.device.type == "cpu" and self.weight.dtype == torch.float32 and onednn_linear_available():
            self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), 64)
            self.weight = nn.Parameter(torch.empty(0), requires_grad=False)  # the packed copy replaces it
        self._plan(act_dtype)


class Int8Embedding(nn.Module):
    """Embedding rows read from an int8 LM head's matrix: a tied model with an 8-bit head holds its
    vocab x hidden matrix once, in int8 (the head is not registered twice: no double counting)."""

    def __init__(self, head: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self._head = (head,)
        self.dtype = dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        head = self._head[0]
        return (head.weight_rows(ids).float() * head.scales[ids, None]).to(self.dtype)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.index = index
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.qkv_proj = Dense(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.qkv_bias)
        self.o_proj = Dense(self.q_size, cfg.hidden_size)
        if cfg.qk_norm:
            full = cfg.qk_norm == "full"
            self.q_norm = RMSNorm(self.q_size if full else cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.kv_size if full else cfg.head_dim, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if cfg.gemma_norms:  # Gemma: post_attention_layernorm norms the attention output; these wrap the MLP
            self.pre_feedforward_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
            self.post_feedforward_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.moe = SparseMoE(cfg.hidden_size, cfg.moe, Dense) if cfg.moe and cfg.moe.sparse_layers[index] else None
        if self.moe is None:
            self.gate_up_proj = Dense(cfg.hidden_size, 2 * cfg.intermediate_size)
            self.down_proj = Dense(cfg.intermediate_size, cfg.hidden_size)

    def norms(self) -> list[str]:
        """This layer's RMSNorm attribute names (the checkpoint's names too)."""
        extra = ["pre_feedforward_layernorm", "post_feedforward_layernorm"] if self.cfg.gemma_norms else []
        return ["input_layernorm", "post_attention_layernorm", *extra] + (["q_norm", "k_norm"] if self.cfg.qk_norm else [])

    def forward(self, x, residual, rope: dict, kv_cache: tuple[torch.Tensor, torch.Tensor], meta, ops):
        """(this layer's MLP output, the residual stream it is to be added to): the add is deferred into
        the next norm, so add + norm is one op (one kernel with FusedOps)."""
        cfg = self.cfg
        h, residual = ops.rms_norm(x, self.input_layernorm.weight, self.input_layernorm.eps, residual,
                                   self.qkv_proj.input_quant)
        q, k, v = self.qkv_proj(h).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if cfg.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if cfg.clip_qkv is not None:
            q, k, v = (t.clamp(-cfg.clip_qkv, cfg.clip_qkv) for t in (q, k, v))
        q = q.view(-1, cfg.num_heads, cfg.head_dim)
        k = k.view(-1, cfg.num_kv_heads, cfg.head_dim)
        v = v.view(-1, cfg.num_kv_heads, cfg.head_dim)
        if cfg.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = rope[cfg.rope_kinds[self.index] if cfg.rope_kinds else None]
        attn = ops.rotary_attend(q, k, v, cos, sin, kv_cache, meta, cfg.sliding_windows[self.index], cfg.scale,
                                 cfg.attn_softcap)
        out = self.o_proj(attn.reshape(-1, self.q_size))
        norm = self.post_attention_layernorm
        if cfg.gemma_norms:  # the normed attention output joins the residual; the MLP's input norm follows
            out = ops.rms_norm(out, norm.weight, norm.eps)[0]
            norm = self.pre_feedforward_layernorm
        if self.moe is not None:
            h, residual = ops.rms_norm(out, norm.weight, norm.eps, residual)
            return self.moe(h, ops), residual
        h, residual = ops.rms_norm(out, norm.weight, norm.eps, residual, self.gate_up_proj.input_quant)
        y = self.down_proj(ops.act_mul(self.gate_up_proj(h), cfg.hidden_act, self.down_proj.input_quant))
        if cfg.gemma_norms:
            y = ops.rms_norm(y, self.post_feedforward_layernorm.weight, self.post_feedforward_layernorm.eps)[0]
        return y, residual


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = Dense(cfg.hidden_size, cfg.vocab_size)  # shares embed_tokens' weight when tied
        self.rotary = LayerRotary(cfg)
        self.dtype = torch.float32  # the activations' dtype (set at load)
        self.ops = TorchOps  # layer_ops.FusedOps on the Triton backend (set by the engine)

    def forward(self, input_ids, positions, kv_caches, meta) -> torch.Tensor:
        """Hidden states [T, hidden] for the flat batch; KV of every token lands in the cache."""
        x = self.embed_tokens(input_ids).to(self.dtype)  # bf16-held rows widen here
        if self.cfg.embed_scale is not None:  # Gemma: scaled by sqrt(hidden) rounded to the dtype, as transformers
            x = x * torch.tensor(self.cfg.embed_scale, dtype=x.dtype)
        rope = {kind: (cos.to(x.dtype), sin.to(x.dtype)) for kind, (cos, sin) in self.rotary(positions).items()}
        residual = None
        for layer, cache in zip(self.layers, kv_caches, strict=True):
            x, residual = layer(x, residual, rope, cache, meta, self.ops)
        return self.ops.rms_norm(x, self.norm.weight, self.norm.eps, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden)
        if self.cfg.final_softcap is not None:  # Gemma 2, as transformers: in the logits' dtype
            logits = torch.tanh(logits / self.cfg.final_softcap) * self.cfg.final_softcap
        return logits

    def load_hf_state_dict(self, state: dict, compute_dtypes: tuple[torch.dtype, ...] = (), lm_head: str = "dense") -> None:
        """Take HF-named weights, fusing q/k/v and gate/up. A weight given quantized (a
        `quant.weights` object) stays quantized: its Dense is swapped for the format's QuantLinear
        (`compute_dtypes`: what its CPU kernels may compute in besides the model's dtype).
        `lm_head="int8"` rounds a dense head to int8 per output row (and a tied embedding with it)."""
        dtype = self.dtype = self.embed_tokens.weight.dtype
        device = self.embed_tokens.weight.device

        def take(name: str, dense: bool = False, linear: bool = False):
            """The tensor in the model's dtype; a linear weight bf16 where `Dense.keeps_bf16` says so."""
            if name not in state:
                raise KeyError(f"checkpoint has no tensor '{name}'")
            value = state[name]
            if is_quantized(value):
                return value.dequantize().to(dtype) if dense else value
            value = value.to(device)
            return value if linear and Dense.keeps_bf16(value, dtype) else value.to(dtype)

        def load_linear(owner: nn.Module, attr: str, weight, bias: torch.Tensor | None = None) -> None:
            if is_quantized(weight):
                setattr(owner, attr, make_quant_linear(weight, bias, device, dtype, compute_dtypes))
            else:
                getattr(owner, attr).load(weight, bias)  # take() gave it in dtype, or bf16 to be kept

        def load_norm(norm: RMSNorm, name: str) -> None:
            if self.cfg.gemma_norms:  # (1 + w), held in fp32: TorchOps.rms_norm then applies it as Gemma does
                norm.weight = nn.Parameter(1.0 + take(name).float(), requires_grad=False)
            else:
                norm.weight.copy_(take(name))

        with torch.no_grad():
            embedding = take("model.embed_tokens.weight", dense=True, linear=True)
            if embedding.dtype == dtype:
                self.embed_tokens.weight.copy_(embedding)
            else:  # bf16 rows, widened per lookup (forward); the tied head reads the same bf16 matrix
                self.embed_tokens.weight = nn.Parameter(embedding.contiguous(), requires_grad=False)
            load_norm(self.norm, "model.norm.weight")
            tied = "lm_head.weight" not in state or self.cfg.tie_word_embeddings
            head = self.embed_tokens.weight if tied else take("lm_head.weight", linear=True)
            if lm_head == "int8" and not is_quantized(head):
                self._int8_head(head, tied, device, dtype, compute_dtypes)
            elif not tied:
                load_linear(self, "lm_head", head)
            else:  # the head reads the embedding itself: no second copy of a vocab x hidden matrix
                self.lm_head.tie(self.embed_tokens.weight, dtype)
            for i, layer in enumerate(self.layers):
                p = f"model.layers.{i}."
                attn = p + "self_attn."
                for name in layer.norms():
                    load_norm(getattr(layer, name), (attn if name in ("q_norm", "k_norm") else p) + name + ".weight")
                if self.cfg.fused_checkpoint:
                    load_linear(layer, "qkv_proj", take(attn + "qkv_proj.weight", linear=True))
                else:
                    qkv_bias = torch.cat([take(attn + f"{n}_proj.bias") for n in "qkv"]) if self.cfg.qkv_bias else None
                    qkv = [take(attn + f"{n}_proj.weight", linear=True) for n in "qkv"]
                    load_linear(layer, "qkv_proj", cat_weights(qkv), qkv_bias)
                load_linear(layer, "o_proj", take(attn + "o_proj.weight", linear=True))
                if layer.moe is not None:
                    layer.moe.load(take, state.__contains__, load_linear, p + self.cfg.moe.prefix)
                    continue
                mlp = p + "mlp."
                if self.cfg.fused_checkpoint:
                    load_linear(layer, "gate_up_proj", take(mlp + "gate_up_proj.weight", linear=True))
                else:
                    gate_up = [take(mlp + "gate_proj.weight", linear=True), take(mlp + "up_proj.weight", linear=True)]
                    load_linear(layer, "gate_up_proj", cat_weights(gate_up))
                load_linear(layer, "down_proj", take(mlp + "down_proj.weight", linear=True))

    def _int8_head(self, weight: torch.Tensor, tied: bool, device, dtype, compute_dtypes) -> None:
        """The head as int8 rows with one scale each: W8A8 on a GPU (the Triton int8 GEMM needs int8
        activations) and on a CPU with AMX where 16-bit activations are allowed (its int8 tiles: the 128k x
        2048 head at one row in ~5 ms against bf16's 23), else weight-only (torch's or our int8 kernel).
        The accuracy cost is the profile's to measure."""
        amx = (device.type == "cpu" and torch.bfloat16 in (dtype, *compute_dtypes)
               and cpu_amx.library() is not None)
        rounded = Int8Weight.rtn(weight.detach().float(), act_quant=device.type == "cuda" or amx)
        self.lm_head = make_quant_linear(rounded, None, device, dtype, compute_dtypes)
        if tied:
            self.embed_tokens = Int8Embedding(self.lm_head, dtype)

    def weight_bytes(self, part: nn.Module | None = None) -> int:
        """Bytes the weights (of `part`, default all) occupy here, as stored for the kernels (quantized,
        packed or plain); a tensor shared by two modules counts once."""
        seen: set[int] = set()
        total = 0
        for module in (part or self).modules():
            tensors = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
            if isinstance(module, Dense) and module.packed is not None:
                tensors.append(module.packed)
            if isinstance(module, RotaryEmbedding):
                continue  # RoPE tables are computed, not weights
            total += getattr(module, "opaque_bytes", 0)  # packed outside tensors (quant/linear.py)
            for t in tensors:
                if t is not None and id(t) not in seen:
                    seen.add(id(t))
                    total += t.numel() * t.element_size()
        return total
