"""The built-in engine against transformers: token-for-token greedy equality under every scheduling
path (prefix-cache hits, tiny prefill chunks, preemption), logits, sampling, stops, and no leaks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import hf_greedy, story_prompts
from transformers import AutoModelForCausalLM, AutoTokenizer

from optcli.engine import Engine, SamplingParams
from optcli.errors import UsageError

MAX_NEW = 24


@pytest.fixture(scope="module")
def stories(stories_dir):
    hf = AutoModelForCausalLM.from_pretrained(stories_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(stories_dir)
    prompts = story_prompts(tok)
    # Shared prefixes: 8 stems, 4 continuations each, arriving in waves so later ones hit the cache.
    stems = story_prompts(tok, 8, seed=1)
    shared = [stems[i % 8] + story_prompts(tok, 32, seed=2)[i][1:6] for i in range(32)]
    return {
        "dir": stories_dir,
        "prompts": prompts,
        "expected": hf_greedy(hf, prompts, MAX_NEW, eos=2),
        "shared": shared,
        "shared_expected": hf_greedy(hf, shared, MAX_NEW, eos=2),
        "hf": hf,
    }


def run_and_check(engine: Engine, prompts, expected) -> list:
    outs = engine.generate(prompts, SamplingParams(max_tokens=MAX_NEW))
    for i, (out, ref) in enumerate(zip(outs, expected, strict=True)):
        assert out.token_ids == ref, f"prompt {i} ({len(prompts[i])} tokens) diverged"
    engine.blocks.check_no_leaks()
    return outs


def test_greedy_matches_transformers_32_prompts_together(stories) -> None:
    engine = Engine(str(stories["dir"]), dtype="float32", max_num_seqs=64)
    outs = run_and_check(engine, stories["prompts"], stories["expected"])
    assert engine.stats()["batch_efficiency"] > 0.2
    assert {o.finish_reason for o in outs} <= {"stop", "length"}


def test_greedy_with_prefix_cache_hits(stories) -> None:
    engine = Engine(str(stories["dir"]), dtype="float32", max_num_seqs=8, block_size=4)
    run_and_check(engine, stories["shared"], stories["shared_expected"])
    first = engine.stats()["prefix_cache_hit_rate"]
    assert first > 0.3  # later continuations of each stem reuse its blocks
    outs = run_and_check(engine, stories["shared"], stories["shared_expected"])  # warm cache: whole prompts hit
    assert engine.stats()["prefix_cache_hit_rate"] > first
    assert all(o.num_cached_tokens >= (len(o.prompt_token_ids) - 1) // 4 * 4 for o in outs)


def test_greedy_with_tiny_prefill_chunks(stories) -> None:
    engine = Engine(str(stories["dir"]), dtype="float32", max_num_seqs=32, max_num_batched_tokens=7)
    run_and_check(engine, stories["prompts"], stories["expected"])


def test_greedy_under_block_pressure_preempts_and_recomputes(stories) -> None:
    engine = Engine(str(stories["dir"]), dtype="float32", max_num_seqs=32, block_size=4, num_kv_blocks=140)
    run_and_check(engine, stories["prompts"], stories["expected"])
    assert engine.stats()["num_preemptions"] > 0


def test_logits_match_transformers(stories) -> None:
    engine = Engine(str(stories["dir"]), dtype="float32")
    ids = stories["prompts"][5] + stories["expected"][5]
    ours = engine.score(ids)
    with torch.no_grad():
        theirs = stories["hf"](torch.tensor([ids])).logits[0]
    assert (ours - theirs).abs().max().item() < 1e-4


def test_abort_half_mid_run_frees_blocks(stories) -> None:
    engine = Engine(str(stories["dir"]), dtype="float32", max_num_seqs=16)
    ids = [engine.add_request(p, SamplingParams(max_tokens=40, ignore_eos=True)) for p in stories["prompts"][:16]]
    for _ in range(5):
        engine.step()
    used = engine.stats()["kv_blocks_total"] - engine.stats()["kv_blocks_free"]
    for rid in ids[::2]:
        assert engine.abort(rid)
    assert engine.stats()["kv_blocks_total"] - engine.stats()["kv_blocks_free"] < used
    finished = []
    while engine.has_unfinished():
        finished += [o for o in engine.step() if o.finished]
    assert sorted(o.request_id for o in finished) == sorted(ids[1::2])
    engine.blocks.check_no_leaks()


def test_seeded_sampling_is_reproducible_whatever_the_batch(stories) -> None:
    engine = Engine(str(stories["dir"]), dtype="float32")
    params = SamplingParams(max_tokens=20, temperature=0.9, top_p=0.9, top_k=50, seed=1234, ignore_eos=True)
    alone = engine.generate([stories["prompts"][3]], params)[0].token_ids
    others = [SamplingParams(max_tokens=30, temperature=1.0) for _ in range(5)]
    crowd = engine.generate(stories["prompts"][:5] + [stories["prompts"][3]], others + [params])[-1].token_ids
    assert alone == crowd
    different = SamplingParams(max_tokens=20, temperature=0.9, top_p=0.9, top_k=50, seed=99, ignore_eos=True)
    assert engine.generate([stories["prompts"][3]], different)[0].token_ids != alone


def test_stop_strings_and_logprobs(stories) -> None:
    engine = Engine(str(stories["dir"]), dtype="float32")
    prompt = "Once upon a time"
    full = engine.generate(prompt, SamplingParams(max_tokens=40))[0]
    word = full.text.split()[3]
    out = engine.generate(prompt, SamplingParams(max_tokens=40, stop=[word], logprobs=2, prompt_logprobs=1))[0]
    assert out.finish_reason == "stop" and word not in out.text and full.text.startswith(out.text)
    assert len(out.logprobs) == len(out.token_ids) and len(out.logprobs[0][2]) == 2
    assert len(out.prompt_logprobs) == len(out.prompt_token_ids) - 1
    logits = engine.score(out.prompt_token_ids)
    expected = torch.log_softmax(logits[-1], -1)[out.token_ids[0]].item()
    assert abs(out.logprobs[0][0] - expected) < 1e-4
    engine.blocks.check_no_leaks()


def test_text_is_transformers_decode_of_prompt_and_output_minus_prompt(stories) -> None:
    """The first token keeps its leading space: "Once upon" + "▁a ▁time ," is " a time,", not "a time,"."""
    engine = Engine(str(stories["dir"]), dtype="float32")
    tok = AutoTokenizer.from_pretrained(stories["dir"])
    out = engine.generate(["Once upon"], SamplingParams(max_tokens=3))[0]
    assert out.token_ids == [261, 378, 432] and out.text == " a time,"
    assert "Once upon" + out.text == tok.decode(out.prompt_token_ids + out.token_ids, skip_special_tokens=True)
    cut = engine.generate(["Once upon"], SamplingParams(max_tokens=3, stop=[" time"]))[0]
    assert cut.text == " a" and cut.finish_reason == "stop"
    prompts = stories["prompts"][:16]
    for stop in (None, ["never there"]):  # the final decode and the incremental (stop-string) path
        outs = engine.generate(prompts, SamplingParams(max_tokens=MAX_NEW, temperature=1.0, seed=3, stop=stop))
        for p, o in zip(prompts, outs, strict=True):
            head = tok.decode(p, skip_special_tokens=True)
            assert head + o.text == tok.decode(p + o.token_ids, skip_special_tokens=True)


def test_stop_token_and_length_finish(stories) -> None:
    # llama2.c's stories end with BOS (its story separator), never with EOS: stop on it explicitly.
    engine = Engine(str(stories["dir"]), dtype="float32")
    outs = engine.generate(stories["prompts"][:8], SamplingParams(max_tokens=300, stop_token_ids=[1]))
    for out in outs:
        if out.finish_reason == "stop":
            assert out.token_ids[-1] == 1 and 1 not in out.token_ids[:-1]
        else:
            assert out.finish_reason == "length" and len(out.token_ids) == 300
    assert any(o.finish_reason == "stop" for o in outs)
    short = engine.generate(stories["prompts"][:2], SamplingParams(max_tokens=3, ignore_eos=True))
    assert all(o.finish_reason == "length" and len(o.token_ids) == 3 for o in short)


def test_builtin_tiny_llama_greedy_matches_transformers() -> None:
    from optcli.checkpoints.resolve import resolve_model

    path = resolve_model("builtin:tiny-llama").path
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    prompts = story_prompts(tok)
    expected = hf_greedy(hf, prompts, MAX_NEW, eos=tok.eos_token_id)
    run_and_check(Engine("builtin:tiny-llama", dtype="float32", max_num_seqs=32), prompts, expected)
    # Tiny prefill chunks, block pressure and (on the second pass) prefix-cache hits, all at once.
    stressed = Engine("builtin:tiny-llama", dtype="float32", max_num_seqs=32, max_model_len=256, max_num_batched_tokens=9,
                      block_size=4, num_kv_blocks=64)
    run_and_check(stressed, prompts, expected)
    run_and_check(stressed, prompts, expected)
    stats = stressed.stats()
    assert stats["num_preemptions"] > 0 and stats["prefix_cache_hit_rate"] > 0


def _random_model(tmp_path: Path, arch: str) -> Path:
    """A small random model of the given family, with the builtin tokenizer."""
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

    from optcli.checkpoints.resolve import resolve_model

    src = resolve_model("builtin:tiny-llama").path
    vocab = json.loads((src / "config.json").read_text())["vocab_size"]
    common = dict(vocab_size=vocab, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  tie_word_embeddings=False, initializer_range=0.1, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    if arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    elif arch == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(head_dim=48, **common))
    elif arch == "mistral":  # a window shorter than the prompts, so it matters
        model = MistralForCausalLM(MistralConfig(sliding_window=24, **common))
    elif arch == "llama3-rope":
        rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
        model = LlamaForCausalLM(LlamaConfig(rope_parameters=rope, **common))
    else:  # linear RoPE scaling
        model = LlamaForCausalLM(LlamaConfig(rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}, **common))
    out = tmp_path / arch
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (out / name).write_bytes((src / name).read_bytes())
    return out


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "mistral", "llama3-rope", "linear-rope"])
def test_model_families_match_transformers(tmp_path: Path, arch: str) -> None:
    path = _random_model(tmp_path, arch)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    prompts = story_prompts(tok)
    engine = Engine(str(path), dtype="float32", max_num_seqs=32, max_num_batched_tokens=64, block_size=8)
    run_and_check(engine, prompts, hf_greedy(hf, prompts, MAX_NEW, eos=2))
    ids = prompts[0] + prompts[1]
    with torch.no_grad():
        assert (engine.score(ids) - hf(torch.tensor([ids])).logits[0]).abs().max().item() < 1e-4


def test_unsupported_architecture_is_named(tmp_path: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    out = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100)).save_pretrained(out)
    with pytest.raises(UsageError, match="GPT2LMHeadModel.*LlamaForCausalLM.*serve --engine vllm.*profile --engine vllm"):
        Engine(str(out), dtype="float32")


@pytest.mark.parametrize("recipe", ["w4a16-rtn", "nf4-bnb"])
def test_quantized_artifacts_run_with_transformers_logits(stories, tmp_path: Path, recipe: str) -> None:
    """compressed-tensors and bitsandbytes artifacts load (dequantized) and score as transformers does."""
    import bitsandbytes as bnb

    from optcli.quantize.pipeline import quantize

    out = tmp_path / recipe
    quantize(str(stories["dir"]), recipe, out, device="cpu")
    engine = Engine(str(out), dtype="float32")
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, device_map="cpu").eval()
    for module in hf.modules():  # run bitsandbytes' layers in fp32 too, so only the format differs
        if isinstance(module, bnb.nn.Linear4bit):
            module.weight.quant_state.dtype = torch.float32
            module.compute_dtype, module.compute_type_is_set = torch.float32, True
            module.support_avx512bf16_for_cpu = False
    ids = stories["prompts"][7] + stories["expected"][7]
    with torch.no_grad():
        theirs = hf(torch.tensor([ids])).logits[0].float()
    ours = engine.score(ids)
    assert (ours - theirs).abs().max().item() <= 1e-4 * theirs.abs().max().item() + 1e-4
    outs = engine.generate(stories["prompts"][:4], SamplingParams(max_tokens=8))
    expected = hf_greedy(hf, stories["prompts"][:4], 8, eos=2)
    assert [o.token_ids for o in outs] == expected
