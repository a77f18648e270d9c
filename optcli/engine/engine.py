"""The engine's public API: `Engine(model).generate(prompts, params)`, and the step-wise interface
(`add_request`, `step`, `abort`) that the server drives.
"""

from __future__ import annotations

import itertools
import time

import psutil
import torch

from optcli.config import EngineConfig
from optcli.engine import kv_storage
from optcli.engine.attention.cpu import build_gather_metadata
from optcli.engine.attention.layout import StepLayout
from optcli.engine.attention.triton import build_triton_metadata
from optcli.engine.cuda_graphs import DecodeGraphs, cuda_capture
from optcli.engine.detokenizer import IncrementalDetokenizer, completion_text
from optcli.engine.kernels import triton_available
from optcli.engine.kernels.cpu_threads import ThreadGovernor
from optcli.engine.kv_cache import BlockManager
from optcli.engine.loading.model import load_engine_model
from optcli.engine.models import moe_summary
from optcli.engine.models.layer_ops import CpuOps, FusedOps
from optcli.engine.outputs import RequestOutput, select_best
from optcli.engine.quant.cpu_choice import kernel_table, mean_matmul_size, tuning_enabled
from optcli.engine.quant.layers import quant_summary
from optcli.engine.runner import ModelRunner
from optcli.engine.sampler import Sampler, TokenHistory, make_generator, token_logprobs
from optcli.engine.sampling_params import SamplingParams, SamplingParamsError
from optcli.engine.scheduler import ScheduledBatch, Scheduler
from optcli.engine.sequence import Sequence, Status
from optcli.engine.structured import Grammars
from optcli.errors import UsageError

STATIC_POLL_S = 0.002  # how long a step sleeps at most while a static batch waits to close


class Engine:
    def __init__(self, model: str, config: EngineConfig | None = None, *, graph_capture=None, **options) -> None:
        """`Engine(model, EngineConfig(...))`, or options by keyword (`Engine(model, dtype="bfloat16")`),
        or both: keywords override the config's fields (every option and its default: `optcli.config`).
        `self.config` is the resolved copy (device and dtype no longer "auto"); `dtype_reason` says why.
        `graph_capture` replaces the CUDA-graph capture function (tests)."""
        if config is not None and not isinstance(config, EngineConfig):
            raise TypeError("Engine(model, config): config must be an EngineConfig; pass other options by keyword")
        config = (config or EngineConfig()).with_options(**options)
        self.model, self.tokenizer, self.eos_token_ids, config, self.dtype_reason = load_engine_model(model, config)
        self.config = config
        device = self.device = config.device
        max_num_seqs, block_size = config.max_num_seqs, config.block_size
        kv_cache_bytes, num_kv_blocks = config.kv_cache_bytes, config.num_kv_blocks
        cfg = self.model.cfg
        self.weights_bytes = self.model.weight_bytes()
        self.quantized_layers = quant_summary(self.model)  # e.g. {"int4/triton": 112}, experts included
        self.moe = moe_summary(self.model)  # how the experts run, router gates unquantized; None when dense
        # each CPU layer kind's kernel per batch-size bucket, and why (quant/cpu_choice.py); {} on a GPU
        self.kernels = kernel_table(self.model)
        # CPU threads: the cores free of other work, re-sampled as the engine steps (kernels/cpu_threads.py)
        self.threads = ThreadGovernor(mean_matmul=mean_matmul_size(self.model)) if device == "cpu" else None
        self.max_model_len = min(config.max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
        self.config = config = config.with_options(max_model_len=self.max_model_len)
        self.max_num_seqs = max_num_seqs
        self.block_size = block_size
        self.backend = _pick_backend(config.attention_backend, device)
        # add+norm, RoPE, SiLU-mul as one kernel each (Triton's on the GPU backend) or one C call each (fp32 on CPU)
        self.model.ops = FusedOps if self.backend == "triton" else CpuOps if device == "cpu" else self.model.ops
        if self.backend == "triton":
            self.model.rotary.build_table(self.max_model_len, self.model.dtype)
        build_metadata = build_triton_metadata if self.backend == "triton" else build_gather_metadata
        budget_tokens = config.max_num_batched_tokens or max(2048, max_num_seqs)
        if not config.enable_chunked_prefill:  # every prompt the engine accepts fits one step whole
            budget_tokens = max(budget_tokens, self.max_model_len)
        calibrated = self.model.calibrated_kv
        self.kv_cache_dtype = kv_dtype = kv_storage.resolve_kv_dtype(config.kv_cache_dtype, self.model.dtype, calibrated)
        per_block = kv_storage.bytes_per_block(cfg, block_size, kv_dtype, self.model.dtype)
        if num_kv_blocks is None:
            wanted = max_num_seqs * -(-self.max_model_len // block_size)  # every sequence at full length
            if kv_cache_bytes is not None:
                budget = kv_cache_bytes
            elif device.startswith("cuda"):
                budget = self._profile_gpu_budget(build_metadata, budget_tokens, config.gpu_memory_utilization)
            else:
                budget = int(_available_host_memory() * 0.25)
            num_kv_blocks = min(wanted, max(0, budget) // per_block)
        if num_kv_blocks * block_size < self.max_model_len:
            raise UsageError(
                f"KV cache of {num_kv_blocks} blocks cannot hold one {self.max_model_len}-token sequence; "
                "give it more memory or lower max_model_len"
            )
        self.kv = kv_storage.allocate(cfg, num_kv_blocks * block_size, kv_dtype, self.model.dtype, device, calibrated)
        self.kv_cache, self.kv_cache_bytes = self.kv.tensor, self.kv.nbytes
        kv_storage.attach_rope(self.kv, self.model.rotary, cfg.rope_kinds, need_table=self.backend == "triton")
        self.blocks = BlockManager(num_kv_blocks, block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.blocks, max_num_seqs, budget_tokens, config.scheduler_policy,
                                   config.max_wait_ms, config.enable_chunked_prefill)
        caches = self.kv.caches
        self.runner = ModelRunner(self.model, caches, block_size, device, build_metadata)
        # Not capturable: dynamic NTK reads positions on the host; MoE routing sizes each expert's GEMM from
        # this step's routing (a graph would replay the capture's expert choice)
        host_reads = self.model.rotary.rope_type == "dynamic" or self.moe is not None
        if self.backend == "triton" and not config.enforce_eager and not host_reads:
            if graph_capture is not None or device.startswith("cuda"):
                max_blocks = -(-self.max_model_len // block_size)
                capture = graph_capture or cuda_capture()
                self.runner.graphs = DecodeGraphs(self.model, caches, max_num_seqs, max_blocks, block_size, device, capture)
                self.kv.reset_dynamic_scales()  # the capture's dummy K/V must not set them
        self.sampler = Sampler()
        self.vocab_size = cfg.vocab_size
        self.grammars = Grammars(self.tokenizer, self.vocab_size, self.eos_token_ids)
        self.requests: dict[str, Sequence] = {}
        self._ids = itertools.count()
        self.num_steps = 0
        self.num_scheduled_seqs = 0  # summed over steps: batch efficiency = this / steps / max_num_seqs

    # --- requests -------------------------------------------------------------------------------
    def check_params(self, params: SamplingParams) -> None:
        """The checks of `params` that need this model (token ids within the vocabulary, a JSON schema the
        grammar library can enforce); raises SamplingParamsError naming the field. Thread-safe, so a
        server can run it before answering."""
        self._check_params(params)

    def _check_params(self, params: SamplingParams):
        params.validate()
        vocab = self.vocab_size
        for name in ("stop_token_ids", "allowed_token_ids", "logit_bias"):
            ids = getattr(params, name) or ()
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise SamplingParamsError(name, f"{name}: token id {bad[0]} is outside this model's vocabulary [0, {vocab})")
        if params.min_tokens and params.allowed_token_ids is not None:
            if set(params.allowed_token_ids) <= set(self.eos_token_ids) | set(params.stop_token_ids):
                raise SamplingParamsError("min_tokens", "min_tokens cannot be met: every allowed token ends the output")
        return self.grammars.matcher(params.json_schema) if params.json_schema is not None else None

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None, request_id: str | None = None) -> str:
        """Queue one completion of `prompt`; n > 1 / best_of fan out with `params.children()` (as `generate` does)."""
        params = params or SamplingParams()
        if params.num_generated != 1:
            raise SamplingParamsError("n", "add_request makes one completion; add params.children() one by one")
        matcher = self._check_params(params)
        if isinstance(prompt, str):
            ids = self.tokenizer(prompt).input_ids
            text = prompt
        else:
            ids, text = [int(t) for t in prompt], None
        if not ids:
            raise ValueError("prompt is empty")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"prompt has {len(ids)} tokens; this engine's max_model_len is {self.max_model_len}")
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self.requests:
            raise ValueError(f"duplicate request id {request_id}")
        seq = Sequence(request_id, ids, params, prompt=text, generator=make_generator(params.seed))
        seq.matcher = matcher
        if params.penalized:
            seq.history = TokenHistory(ids, self.vocab_size, self.device)
        self.requests[request_id] = seq
        self.scheduler.add(seq)
        return request_id

    def abort(self, request_id: str) -> bool:
        seq = self.requests.pop(request_id, None)
        if seq is None or seq.is_finished:
            return False
        self.scheduler.finish(seq, "abort")
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    # --- one iteration --------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        batch = self.scheduler.schedule()
        if not batch.items:
            # a static batch waiting to close: sleep a slice of the wait, then let the caller add requests
            wait = self.scheduler.batch_wait_s()
            if wait:
                time.sleep(min(wait, STATIC_POLL_S))
            return []
        if self.threads is not None:
            self.threads.update()
        out = self.runner.run(batch)
        self.num_steps += 1
        self.num_scheduled_seqs += len(batch.items)
        for seq, n in batch.items:
            seq.num_computed_tokens += n
            self.blocks.commit_full_blocks(seq)
        for rid, (first, logits) in out.prompt_logits.items():
            seq = self.requests[rid]
            targets = torch.tensor(seq.token_ids[first + 1 : first + 1 + len(logits)])
            seq.prompt_logprobs.extend(token_logprobs(logits.float(), targets, seq.params.prompt_logprobs))
        outputs = []
        if out.sample_seqs:
            seqs = out.sample_seqs
            params = [s.params for s in seqs]
            grammar_rows = [i for i, s in enumerate(seqs) if s.matcher is not None]
            mask = (grammar_rows, self.grammars.fill([seqs[i].matcher for i in grammar_rows])) if grammar_rows else None
            tokens = self.sampler(
                out.sample_logits, params, [s.generator for s in seqs],
                histories=[s.history for s in seqs], num_output_tokens=[s.num_output_tokens for s in seqs],
                token_mask=mask, eos_token_ids=self.eos_token_ids,
            )
            for row, (seq, token) in enumerate(zip(seqs, tokens.tolist(), strict=True)):
                if seq.params.logprobs is not None:
                    entry = token_logprobs(out.sample_logits[row : row + 1], tokens[row : row + 1], seq.params.logprobs)
                    seq.logprobs.extend(entry)
                    seq.cumulative_logprob += entry[0][0]
                seq.token_ids.append(token)
                if seq.history is not None:
                    seq.history.append(token)
                if seq.matcher is not None:
                    seq.matcher.consume_token(token)
                self._check_stop(seq, token)
                outputs.append(self._output(seq, [token]))
        return outputs

    def _check_stop(self, seq: Sequence, token: int) -> None:
        p = seq.params
        reason = None
        if (token in self.eos_token_ids and not p.ignore_eos) or token in p.stop_token_ids:
            reason = "stop"
        if seq.matcher is not None and (seq.matcher.is_stopped() or seq.matcher.is_error()):
            reason = "stop"  # the grammar is complete (or hit a resource limit, which allows EOS only)
        text = None
        if p.stop:  # the returned text ends before the first stop string
            if seq.detokenizer is None:
                seq.detokenizer = IncrementalDetokenizer(self.tokenizer, seq.prompt_token_ids,
                                                         skip=seq.num_prompt_tokens)
            seq.detokenizer.update(seq.token_ids)
            cut = seq.detokenizer.find_stop(p.stop)
            if cut >= 0:
                text, reason = seq.detokenizer.full_text[:cut], "stop"
        if reason is None and (seq.num_output_tokens >= p.max_tokens or seq.num_tokens >= self.max_model_len):
            reason = "length"
        if reason is not None:
            if text is None:  # the prompt's last tokens give the first token its context (its leading space)
                detok = seq.detokenizer
                text = detok.full_text if detok is not None else completion_text(
                    self.tokenizer, seq.prompt_token_ids, seq.output_token_ids)
            seq.text = text
            self.scheduler.finish(seq, reason)
            self.requests.pop(seq.request_id, None)

    def _output(self, seq: Sequence, new: list[int]) -> RequestOutput:
        return RequestOutput(
            request_id=seq.request_id,
            prompt=seq.prompt,
            prompt_token_ids=seq.prompt_token_ids,
            token_ids=seq.output_token_ids,
            new_token_ids=new,
            text=seq.text,
            finished=seq.status == Status.FINISHED,
            finish_reason=seq.finish_reason,
            logprobs=seq.logprobs if seq.params.logprobs is not None else None,
            prompt_logprobs=seq.prompt_logprobs if seq.params.prompt_logprobs is not None else None,
            num_cached_tokens=seq.num_cached_tokens,
            cumulative_logprob=seq.cumulative_logprob if seq.params.logprobs is not None else None,
        )

    # --- batch API ------------------------------------------------------------------------------
    def generate(
        self, prompts: list[str | list[int]] | str, params: SamplingParams | list[SamplingParams] | None = None
    ) -> list[RequestOutput]:
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not isinstance(params, list):
            params = [params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(params)} SamplingParams for {len(prompts)} prompts")
        for sp in params:
            self._check_params(sp)  # before anything is queued: a bad request leaves the engine idle
        ids = [[self.add_request(p, child) for child in sp.children()] for p, sp in zip(prompts, params, strict=True)]
        final: dict[str, RequestOutput] = {}
        while self.has_unfinished():
            for out in self.step():
                if out.finished:
                    final[out.request_id] = out
        results = []
        for group, sp in zip(ids, params, strict=True):
            best = select_best([final[i] for i in group], sp)
            best[0].siblings = best[1:]
            results.append(best[0])
        return results

    @torch.inference_mode()
    def _profile_gpu_budget(self, build_metadata, num_tokens: int, utilization: float) -> int:
        """KV-cache bytes left after a throwaway forward at the largest batch: `utilization` of the
        GPU minus the weights and the peak activations that forward needed (as vLLM sizes it)."""
        cfg, bs = self.model.cfg, self.block_size
        num_tokens = min(num_tokens, self.max_model_len)
        blocks = -(-num_tokens // bs)
        scratch = torch.zeros(
            (cfg.num_layers, 2, blocks * bs, cfg.num_kv_heads, cfg.head_dim),
            dtype=self.model.dtype, device=self.device,
        )
        positions = list(range(num_tokens))
        layout = StepLayout(positions, [range(num_tokens)], [positions], [num_tokens], [list(range(blocks))], bs)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        ids = torch.zeros(num_tokens, dtype=torch.long, device=self.device)
        hidden = self.model(ids, torch.arange(num_tokens, device=self.device), [(c[0], c[1]) for c in scratch],
                            build_metadata(layout, self.device))
        self.model.compute_logits(hidden[-self.max_num_seqs :])
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        del scratch, hidden
        torch.cuda.empty_cache()
        total = torch.cuda.get_device_properties(torch.device(self.device)).total_memory
        return int(total * utilization - peak)

    @torch.inference_mode()
    def score(self, token_ids: list[int], chunk: int | None = None) -> torch.Tensor:
        """Logits [T, V] of every position of one sequence through the paged path (tests, accuracy). `chunk`:
        feed it that many tokens a step, so later steps read earlier K/V back from the cache (1: decode steps)."""
        if self.scheduler.has_work():
            raise RuntimeError("score() needs an idle engine")
        seq = Sequence("score", list(token_ids), SamplingParams(max_tokens=1, prompt_logprobs=0))
        self.blocks.allocate(seq, seq.num_tokens)
        rows = []
        try:
            while seq.num_computed_tokens < seq.num_tokens:
                n = min(chunk or seq.num_tokens, seq.num_tokens - seq.num_computed_tokens)
                out = self.runner.run(ScheduledBatch([(seq, n)]))
                seq.num_computed_tokens += n
                rows += [out.prompt_logits["score"][1]] if "score" in out.prompt_logits else []
        finally:
            self.blocks.free(seq)
        return torch.cat([r.float() for r in rows] + [out.sample_logits.float()])

    def head_cost(self, reps: int = 5) -> dict:
        """What the LM head costs a decode token: its weight bytes (read once per step whatever the batch)
        and its measured time at one row, best of `reps` after a warm-up."""
        nbytes = self.model.weight_bytes(self.model.lm_head)
        hidden = torch.randn(1, self.model.cfg.hidden_size, dtype=self.model.dtype,
                             device=self.device)
        best = float("inf")
        with torch.inference_mode():
            for _ in range(reps + 1):
                start = time.perf_counter()
                self.model.compute_logits(hidden)
                if self.device.startswith("cuda"):
                    torch.cuda.synchronize()
                best = min(best, time.perf_counter() - start)
        return {"head_bytes": nbytes, "head_share_of_weights": nbytes / self.weights_bytes,
                "head_ms_per_step_m1": best * 1e3, "tied": self.model.cfg.tie_word_embeddings}

    def stats(self) -> dict:
        b = self.blocks
        return {
            "device": self.device,
            "dtype": self.config.dtype,
            "kv_blocks_total": b.num_blocks,
            "kv_blocks_free": b.num_free_blocks,
            "kv_block_size": b.block_size,
            "kv_cache_bytes": self.kv_cache_bytes,
            "kv_cache_usage": 1 - b.num_free_blocks / b.num_blocks,
            "kv_cache": self.kv.describe(b.block_size),
            "num_running": len(self.scheduler.running),
            "num_waiting": len(self.scheduler.waiting),
            "num_preemptions": self.scheduler.num_preemptions,
            "static_pad_rows": self.scheduler.num_pad_rows,  # static batching: finished members recomputed as padding
            "prefix_cache_hit_rate": b.prefix_hits / b.prefix_queries if b.prefix_queries else 0.0,
            "num_steps": self.num_steps,
            "batch_efficiency": self.num_scheduled_seqs / self.num_steps / self.max_num_seqs if self.num_steps else None,
            "weights_bytes": self.weights_bytes,
            "quantized_layers": self.quantized_layers,
            "moe": self.moe,
            "dtype_reason": self.dtype_reason,
            "kernels": self.kernel_paths(),
            "cpu_threads": None if self.threads is None else self.threads.stats(),
        }

    def thread_rule(self) -> dict | None:
        """The CPU thread ceiling and why (`kernels/cpu_threads.py`: the model's width, the usable cores, or the
        user's pin); the count under it follows the free cores as the engine steps. None on a GPU."""
        return None if self.threads is None else {"ceiling": self.threads.max_threads, "reason": self.threads.reason}

    def kernel_paths(self) -> dict:
        """For each CPU layer kind (qkv, o, gate_up, down, lm_head, ...) and batch-size bucket: the kernel
        and the reason (`quant/cpu_choice.py`); fixed at load, except what `OPTCLI_CPU_TUNE=1` timed since."""
        return kernel_table(self.model) if tuning_enabled() else self.kernels


def _pick_backend(name: str, device: str) -> str:
    if name == "auto":
        name = "triton" if device.startswith("cuda") else "gather"
    if name not in ("gather", "triton"):
        raise UsageError(f"attention backend must be auto, gather or triton (got '{name}')")
    if name == "triton":
        if not triton_available():
            raise UsageError("the triton attention backend needs a CUDA GPU (or TRITON_INTERPRET=1 for tests)")
    elif device.startswith("cuda"):
        raise UsageError("the gather attention backend is the CPU path; use triton (or auto) on a GPU")
    return name


def _available_host_memory() -> int:
    return psutil.virtual_memory().available
