"""The GPU attention path, run on CPU under Triton's interpreter: the engine with the Triton kernels
(and CUDA-graph bucketing, captured by an eager stand-in) must still match transformers exactly."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from optcli.checkpoints.resolve import resolve_model
from optcli.engine import Engine, SamplingParams
from optcli.engine.cuda_graphs import batch_buckets

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() and __import__("os").environ.get("TRITON_INTERPRET") != "1",
    reason="needs a GPU or TRITON_INTERPRET=1",
)


class EagerCapture:
    """Stands in for torch.cuda.graph: 'replay' re-runs the step function on the static buffers."""

    def __init__(self) -> None:
        self.captured: list[int] = []
        self.replays = 0

    def __call__(self, fn):
        self.captured.append(fn.__closure__ is not None)

        def replay():
            self.replays += 1
            return fn()

        return replay


@pytest.fixture(scope="module")
def tiny():
    path = resolve_model("builtin:tiny-llama").path
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    prompts = [tok(t).input_ids for t in ("Once upon a time", "The cat sat on the mat and then", "def f(x):", "3 + 4 =")]
    expected = []
    for p in prompts:
        ids = hf.generate(torch.tensor([p]), max_new_tokens=6, do_sample=False, attention_mask=torch.ones(1, len(p), dtype=torch.long))
        expected.append(ids[0, len(p):].tolist())
    return path, prompts, expected


def test_buckets_cover_every_batch_size() -> None:
    assert batch_buckets(64) == [1, 2, 4, 8, 16, 32, 64]
    assert batch_buckets(48) == [1, 2, 4, 8, 16, 32, 48]
    assert batch_buckets(1) == [1]


def test_triton_backend_with_graph_buckets_matches_transformers(tiny) -> None:
    path, prompts, expected = tiny
    capture = EagerCapture()
    engine = Engine(str(path), dtype="float32", max_num_seqs=4, max_model_len=64, attention_backend="triton", graph_capture=capture)
    assert len(capture.captured) == 3  # buckets 4, 2, 1
    outs = engine.generate(prompts, SamplingParams(max_tokens=6))
    assert [o.token_ids for o in outs] == expected
    assert capture.replays > 0  # decode steps went through the graph path, padded to buckets
    engine.blocks.check_no_leaks()


def test_triton_backend_eager_with_chunked_prefill(tiny) -> None:
    path, prompts, expected = tiny
    engine = Engine(str(path), dtype="float32", max_num_seqs=4, max_model_len=64, attention_backend="triton", enforce_eager=True,
                    max_num_batched_tokens=5, block_size=4)
    assert engine.runner.graphs is None
    outs = engine.generate(prompts, SamplingParams(max_tokens=6))
    assert [o.token_ids for o in outs] == expected
