"""Accuracy through the engine that serves a model against transformers' figures for the same model and
tokens (stories260K and its W4A16 artifact), and the one-model-at-a-time path's spill to disk."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import shared_data

from optcli.bench.accuracy import evaluate, evaluate_in_turn
from optcli.bench.targets.builtin import measure_accuracy
from optcli.config import EngineConfig

# Both sides in fp32 here, so the only differences are the kernels': the engine's paged attention and
# fused q/k/v against transformers' eager modules, and for W4A16 our int4 kernels against compressed-tensors'
# dequantized weights. Stated tolerances: perplexity within 0.1% relative, KLD within 10% relative (or 1e-4
# absolute), top-1 agreement within 0.01.
FP32 = EngineConfig(device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def text() -> str:
    return shared_data("tinystories_train_sample.txt").read_text(encoding="utf-8")[:6000]


@pytest.fixture(scope="module")
def w4a16(stories_dir: Path, tmp_path_factory) -> Path:
    from optcli.quantize.pipeline import quantize

    out = tmp_path_factory.mktemp("acc") / "w4a16"
    quantize(str(stories_dir), "w4a16-rtn", out, device="cpu")
    return out


def agree(engine: dict, hf: dict) -> None:
    assert engine["tokens_scored"] == hf["tokens_scored"] > 500
    assert engine["ppl"] == pytest.approx(hf["ppl"], rel=1e-3)
    assert engine["baseline_ppl"] == pytest.approx(hf["baseline_ppl"], rel=1e-3)
    assert engine["kld_mean"] == pytest.approx(hf["kld_mean"], rel=0.1, abs=1e-4)
    assert abs(engine["top1_agreement"] - hf["top1_agreement"]) <= 0.01


def test_engine_and_transformers_agree_on_a_dense_model(stories_dir: Path, text: str) -> None:
    engine = measure_accuracy(stories_dir, stories_dir, text, FP32, "engine")
    hf = measure_accuracy(stories_dir, stories_dir, text, FP32, "transformers")
    agree(engine, hf)
    assert engine["kld_mean"] < 1e-6 and engine["top1_agreement"] == 1.0


def test_engine_and_transformers_agree_on_a_w4a16_artifact(stories_dir: Path, w4a16: Path, text: str) -> None:
    engine = measure_accuracy(w4a16, stories_dir, text, FP32, "engine")
    hf = measure_accuracy(w4a16, stories_dir, text, FP32, "transformers")
    agree(engine, hf)
    assert engine["kld_mean"] > 1e-3 and engine["top1_agreement"] < 1.0  # a real, measured loss


def test_in_turn_spills_the_baseline_to_disk_and_drops_it_before_the_candidate(tmp_path: Path) -> None:
    """With a zero budget every baseline window goes to disk; the result equals `evaluate`'s, and the
    baseline is gone (collected) before the candidate is built."""
    import gc
    import weakref

    class Tiny(torch.nn.Module):
        def __init__(self, seed: int) -> None:
            super().__init__()
            self.emb = torch.nn.Embedding(50, 50)
            torch.nn.init.normal_(self.emb.weight, generator=torch.Generator().manual_seed(seed))

        def forward(self, ids):
            return type("Out", (), {"logits": self.emb(ids)})()

    ids = torch.randint(0, 50, (300,), generator=torch.Generator().manual_seed(0)).tolist()
    want = evaluate(Tiny(1), ids, Tiny(2), ctx=64)
    alive: list = []

    def baseline():
        model = Tiny(2)
        alive.append(weakref.ref(model))
        return model

    def candidate():
        gc.collect()
        assert alive[0]() is None, "the baseline is still resident"
        return Tiny(1)

    got = evaluate_in_turn(candidate, baseline, ids, ctx=64, budget=0)
    assert got.as_dict() == pytest.approx(want.as_dict())


KILLED_WHILE_SPILLED = """
import os, torch
from optcli.bench.accuracy import evaluate_in_turn

class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(50, 50)

    def forward(self, ids):
        return type("Out", (), {"logits": self.emb(ids)})()

def killed():  # the candidate never arrives: the run is killed with the baseline spilled to disk
    os.kill(os.getpid(), 9)

evaluate_in_turn(killed, Tiny, [i % 50 for i in range(300)], ctx=64, budget=0)
"""


def test_a_killed_runs_spilled_log_probs_are_removed_by_the_next_run(tmp_path: Path, monkeypatch) -> None:
    """A profile killed mid-accuracy cannot remove its optcli-logprobs-* directory; the next one does."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "TMPDIR": str(tmp_path), "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    killed = subprocess.run([sys.executable, "-c", KILLED_WHILE_SPILLED], env=env, capture_output=True, timeout=120)
    assert killed.returncode == -9, killed.stderr
    [left] = tmp_path.glob("optcli-logprobs-*")
    assert list(left.glob("*.pt"))  # the baseline's log-probs, on disk
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = torch.nn.Embedding(50, 50)

        def forward(self, ids):
            return type("Out", (), {"logits": self.emb(ids)})()

    evaluate_in_turn(Tiny, Tiny, [i % 50 for i in range(300)], ctx=64, budget=0)
    assert list(tmp_path.glob("optcli-logprobs-*")) == []
