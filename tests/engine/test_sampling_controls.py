"""The sampling controls beyond temperature / top-k / top-p, as vLLM defines them: logit_bias, presence,
frequency and repetition penalties, min_tokens, min_p, allowed_token_ids, n / best_of and a JSON schema
(constrained decoding), in the sampler and through `Engine.generate`."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from optcli.engine import Engine, SamplingParams
from optcli.engine.sampler import Sampler, TokenHistory, make_generator, process_logits
from optcli.engine.sampling_params import SamplingParamsError

PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine("builtin:tiny-llama", dtype="float32", max_num_seqs=8, max_model_len=512)


def _logits(seed: int, batch: int, vocab: int) -> torch.Tensor:
    return torch.randn(batch, vocab, generator=torch.Generator().manual_seed(seed)) * 3


# --- the sampler ------------------------------------------------------------------------------------
def test_logit_bias_adds_to_the_logits_and_moves_greedy() -> None:
    logits = _logits(0, 2, 50)
    top = int(logits[0].argmax())
    p = SamplingParams(logit_bias={top: -100.0, 7: 2.5})
    out = process_logits(logits, [p, SamplingParams()])
    assert out[0, top] == pytest.approx(float(logits[0, top]) - 100) and out[0, 7] == pytest.approx(float(logits[0, 7]) + 2.5)
    assert torch.equal(out[1], logits[1])  # an unbiased row in the same batch is untouched
    assert int(Sampler()(logits, [p, SamplingParams()], [None, None])[0]) != top
    assert int(Sampler()(logits[:1], [SamplingParams(logit_bias={11: 100.0})], [None])[0]) == 11


def test_penalties_follow_vllm_formulas() -> None:
    vocab = 40
    logits = _logits(1, 1, vocab)
    prompt, output = [3, 4, 5], [5, 6, 6, 6]
    hist = TokenHistory(prompt, vocab)
    for t in output:
        hist.append(t)
    p = SamplingParams(repetition_penalty=1.7, presence_penalty=0.5, frequency_penalty=0.25)
    got = process_logits(logits, [p], histories=[hist])[0]
    want = logits[0].clone()
    for t in set(prompt + output):  # repetition: prompt + output, divide positive, multiply negative
        want[t] = want[t] / 1.7 if want[t] > 0 else want[t] * 1.7
    for t in set(output):  # presence once, frequency per occurrence: output only
        want[t] -= 0.5 + 0.25 * output.count(t)
    assert torch.allclose(got, want)


def test_repetition_penalty_matches_transformers_processor() -> None:
    from transformers import RepetitionPenaltyLogitsProcessor

    logits = _logits(2, 3, 64)
    histories_ids = [[1, 2, 3, 3], [10, 63], [5]]
    hist = [TokenHistory(ids, 64) for ids in histories_ids]
    got = process_logits(logits, [SamplingParams(repetition_penalty=1.3)] * 3, histories=hist)
    for i, ids in enumerate(histories_ids):
        want = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([ids]), logits[i : i + 1].clone())
        assert torch.allclose(got[i], want[0])


def test_min_tokens_suppresses_eos_and_stop_tokens_until_reached() -> None:
    logits = torch.zeros(1, 10)
    logits[0, 2] = 10  # EOS wins unless suppressed
    logits[0, 4] = 9  # then the stop token
    p = SamplingParams(min_tokens=3, stop_token_ids=[4])
    for done, want in ((0, False), (2, False), (3, True)):
        out = process_logits(logits, [p], num_output_tokens=[done], eos_token_ids={2})
        assert (out is None or bool(torch.isfinite(out[0, 2]))) == want
        token = int(Sampler()(logits, [p], [None], num_output_tokens=[done], eos_token_ids={2})[0])
        assert token == 2 if want else token not in (2, 4)
    # min_tokens never leaves a row without a token: if only EOS is allowed, EOS stays
    only_eos = SamplingParams(min_tokens=3, allowed_token_ids=[2, 3])
    mask = ([0], torch.tensor([[i == 2 for i in range(10)]]))
    assert int(Sampler()(logits, [only_eos], [None], num_output_tokens=[0], token_mask=mask, eos_token_ids={2})[0]) == 2


def test_min_p_and_allowed_token_ids_bound_the_draws() -> None:
    logits = _logits(3, 1, 30) / 6  # a flat distribution: several tokens pass the min-p floor
    probs = logits[0].softmax(-1)
    keep = {t for t in range(30) if probs[t] >= 0.2 * probs.max()}
    gen = make_generator(0)
    p = SamplingParams(temperature=1.0, min_p=0.2, seed=0)
    drawn = {int(Sampler()(logits, [p], [gen])[0]) for _ in range(200)}
    assert drawn <= keep and len(drawn) > 1
    p = SamplingParams(temperature=1.0, allowed_token_ids=[1, 5, 9])
    assert {int(Sampler()(logits, [p], [None])[0]) for _ in range(100)} <= {1, 5, 9}


def test_new_fields_are_range_checked_by_name() -> None:
    bad = {"seed": 10**23, "presence_penalty": 2.5, "frequency_penalty": math.nan, "repetition_penalty": 0.0,
           "min_p": 1.5, "min_tokens": 99, "logit_bias": {3: 101.0}, "allowed_token_ids": [], "n": 0, "best_of": 0}
    for name, value in bad.items():
        with pytest.raises(SamplingParamsError) as e:
            SamplingParams(max_tokens=16, **{name: value})
        assert e.value.param == name


# --- the engine -------------------------------------------------------------------------------------
def test_greedy_with_repetition_penalty_and_min_tokens_matches_transformers(engine: Engine) -> None:
    from optcli.checkpoints.resolve import resolve_model

    hf = AutoModelForCausalLM.from_pretrained(resolve_model("builtin:tiny-llama").path, dtype=torch.float32).eval()
    ids = engine.tokenizer(PROMPT).input_ids
    ref = hf.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False, repetition_penalty=1.3,
                      eos_token_id=2, pad_token_id=0)[0, len(ids):].tolist()
    out = engine.generate([ids], SamplingParams(max_tokens=24, repetition_penalty=1.3))[0]
    assert out.token_ids == ref
    assert out.token_ids != engine.generate([ids], SamplingParams(max_tokens=24))[0].token_ids


def test_presence_and_frequency_penalties_change_greedy_as_their_formula_says(engine: Engine) -> None:
    ids = engine.tokenizer(PROMPT).input_ids
    plain = engine.generate([ids], SamplingParams(max_tokens=40, ignore_eos=True))[0].token_ids
    assert len(set(plain)) < len(plain)  # the tiny model repeats itself greedily
    for kw in ({"presence_penalty": 2.0}, {"frequency_penalty": 2.0}):
        out = engine.generate([ids], SamplingParams(max_tokens=40, ignore_eos=True, **kw))[0].token_ids
        # reference: our own forward, one step at a time, the OpenAI formula applied by hand
        ref: list[int] = []
        for _ in range(40):
            logits = engine.score(ids + ref)[-1].clone()
            for t in set(ref):
                logits[t] -= kw.get("presence_penalty", 0) + kw.get("frequency_penalty", 0) * ref.count(t)
            ref.append(int(logits.argmax()))
        assert out == ref and out != plain


def test_logit_bias_minus_100_means_never(engine: Engine) -> None:
    ids = engine.tokenizer(PROMPT).input_ids
    sampled = engine.generate([ids] * 4, SamplingParams(max_tokens=48, temperature=1.0, seed=1, ignore_eos=True))
    common = max(range(engine.vocab_size), key=lambda t: sum(o.token_ids.count(t) for o in sampled))
    assert sum(o.token_ids.count(common) for o in sampled) > 3
    biased = engine.generate([ids] * 4, SamplingParams(max_tokens=48, temperature=1.0, seed=1, ignore_eos=True,
                                                        logit_bias={common: -100.0}))
    assert all(common not in o.token_ids for o in biased)
    forced = engine.generate([ids], SamplingParams(max_tokens=5, logit_bias={common: 100.0}))[0]
    assert forced.token_ids == [common] * 5


def test_min_tokens_holds_off_eos(engine: Engine) -> None:
    ids = engine.tokenizer(PROMPT).input_ids
    eager = SamplingParams(max_tokens=20, logit_bias={2: 100.0})  # EOS at once
    assert engine.generate([ids], eager)[0].token_ids == [2]
    out = engine.generate([ids], SamplingParams(max_tokens=20, logit_bias={2: 100.0}, min_tokens=6))[0]
    assert len(out.token_ids) == 7 and out.token_ids[-1] == 2 and 2 not in out.token_ids[:6]
    assert out.finish_reason == "stop"


def test_n_and_best_of(engine: Engine) -> None:
    ids = engine.tokenizer(PROMPT).input_ids
    p = SamplingParams(max_tokens=10, temperature=1.0, seed=7, n=3, ignore_eos=True)
    out = engine.generate([ids, ids], p)
    assert len(out) == 2 and all(len(o.outputs) == 3 for o in out)
    assert [o.index for o in out[0].outputs] == [0, 1, 2]
    assert len({tuple(o.token_ids) for o in out[0].outputs}) == 3  # three different completions
    assert [o.token_ids for o in out[0].outputs] == [o.token_ids for o in out[1].outputs]  # seeded
    assert out[0].token_ids == engine.generate([ids], SamplingParams(max_tokens=10, temperature=1.0, seed=7,
                                                                     ignore_eos=True))[0].token_ids

    best = engine.generate([ids], SamplingParams(max_tokens=10, temperature=1.0, seed=7, n=2, best_of=5,
                                                 ignore_eos=True))[0]
    children = engine.generate([ids] * 5, [SamplingParams(max_tokens=10, temperature=1.0, seed=7 + j, logprobs=0,
                                                          ignore_eos=True) for j in range(5)])
    ranked = sorted(children, key=lambda o: -o.cumulative_logprob)
    assert [o.token_ids for o in best.outputs] == [o.token_ids for o in ranked[:2]]
    assert best.logprobs is None and best.cumulative_logprob is None  # ranking logprobs are not returned
    assert children[0].cumulative_logprob == pytest.approx(sum(lp for lp, _, _ in children[0].logprobs))
    with pytest.raises(SamplingParamsError):
        engine.add_request(ids, SamplingParams(n=2))


SCHEMA = {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]},
                                           "size": {"type": "integer", "minimum": 0, "maximum": 99}},
          "required": ["color", "size"], "additionalProperties": False}


def test_json_schema_output_always_parses_and_matches(engine: Engine) -> None:
    ids = engine.tokenizer(PROMPT).input_ids
    outs = engine.generate([ids] * 6, [SamplingParams(max_tokens=40, temperature=1.0, seed=s, json_schema=SCHEMA)
                                       for s in range(6)])
    for out in outs:
        value = json.loads(out.text)
        assert set(value) == {"color", "size"} and value["color"] in ("red", "green", "blue")
        assert 0 <= value["size"] <= 99 and out.finish_reason == "stop"
    plain = engine.generate([ids], SamplingParams(max_tokens=40))[0].text
    with pytest.raises(ValueError):
        json.loads(plain)  # unconstrained, the tiny model writes no JSON
    # a constrained and an unconstrained request share a batch without touching each other
    mixed = engine.generate([ids, ids], [SamplingParams(max_tokens=40, json_schema=SCHEMA), SamplingParams(max_tokens=40)])
    assert mixed[1].text == plain and json.loads(mixed[0].text)["color"] in ("red", "green", "blue")
    engine.blocks.check_no_leaks()


def test_check_params_names_the_field(engine: Engine) -> None:
    vocab = engine.vocab_size
    cases = {"logit_bias": {"logit_bias": {vocab: 1.0}}, "allowed_token_ids": {"allowed_token_ids": [vocab + 5]},
             "stop_token_ids": {"stop_token_ids": [-1 + 2 * vocab]},
             "json_schema": {"json_schema": {"not": {"type": "string"}}},
             "min_tokens": {"min_tokens": 2, "allowed_token_ids": [2]}}
    for name, kw in cases.items():
        with pytest.raises(SamplingParamsError) as e:
            engine.check_params(SamplingParams(max_tokens=8, **kw))
        assert e.value.param == name, name
    with pytest.raises(SamplingParamsError) as e:
        engine.generate([PROMPT], SamplingParams(max_tokens=4, json_schema={"$ref": "#/$defs/a",
                                                                            "$defs": {"a": {"$ref": "#/$defs/a"}}}))
    assert e.value.param == "json_schema" and not engine.has_unfinished()
