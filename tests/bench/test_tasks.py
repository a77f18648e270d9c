"""Task accuracy the way users judge a quantized model: a local lm-evaluation-harness task (YAML + JSONL,
offline) run through our engine for a W4A16 artifact of stories260K and for its source, the recovery in
report.json / .md / .html and gated by `min_task_recovery`; unknown and hub-only tasks are exit 2."""

from __future__ import annotations

import functools
import json
import random
from pathlib import Path

import helpers
import pytest
from helpers import shared_data

from optcli.bench.kpi import evaluate_kpis, load_kpi

SMALL = ["--requests", "2", "--prompt-len", "8:12", "--output-len", "2", "--concurrency", "1"]
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


optcli = functools.partial(helpers.optcli, env=OFFLINE, timeout=900)


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    """`story_end`: which of two endings continues a TinyStories sentence (the other is another story's)."""
    root = tmp_path_factory.mktemp("tasks")
    text = shared_data("tinystories_train_sample.txt").read_text(encoding="utf-8")
    sentences = [s.strip() for s in text.replace("\n", " ").split(".") if len(s.split()) > 8][:200]
    rng = random.Random(0)
    rows = []
    for i in range(30):
        words, other = sentences[i].split(), sentences[i + 100].split()
        right, wrong = " " + " ".join(words[len(words) // 2 :]), " " + " ".join(other[len(other) // 2 :])
        label = rng.randrange(2)
        rows.append({"context": " ".join(words[: len(words) // 2]), "choices": [right, wrong][:: 1 - 2 * label],
                     "label": label})
    data = root / "story_end.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (root / "story_end.yaml").write_text(
        f"task: story_end\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
        "output_type: multiple_choice\ndoc_to_text: '{{context}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{label}}'\nmetric_list:\n  - metric: acc\n    aggregation: mean\n"
        "    higher_is_better: true\n", encoding="utf-8")
    return root


def test_a_local_task_runs_through_the_engine_for_artifact_and_source(stories_dir: Path, task_dir: Path,
                                                                       tmp_path: Path) -> None:
    from optcli.quantize.pipeline import quantize

    artifact = tmp_path / "w4"
    quantize(str(stories_dir), "w4a16-rtn", artifact, device="cpu")
    impossible = tmp_path / "kpi.yaml"
    impossible.write_text("accuracy: {min_task_recovery: 1.5}\n")
    out = tmp_path / "report"
    result = optcli("profile", str(artifact), "--tasks", "story_end", "--tasks-path", str(task_dir), "--limit", "20",
                    *SMALL, "--kpi", str(impossible), "--out", str(out))
    assert result.returncode == 3, result.stderr
    assert "story_end acc" in result.stdout
    report = json.loads((out / "report.json").read_text())
    (row,) = report["accuracy"]["tasks"]
    assert row["task"] == "story_end" and row["metric"] == "acc"
    assert 0 < row["candidate"] <= 1 and 0 < row["baseline"] <= 1
    assert row["recovery"] == pytest.approx(row["candidate"] / row["baseline"])
    assert report["workload"]["tasks"] == {"names": ["story_end"], "tasks_path": str(task_dir), "limit": 20,
                                           "num_fewshot": None}
    (check,) = report["kpi"]["checks"]
    assert not check["passed"] and check["value"] == row["recovery"] and check["baseline"] == row["baseline"]
    lenient = tmp_path / "lenient.yaml"
    lenient.write_text("accuracy: {min_task_recovery: 0.1, acceptable_drop: 1.0}\n")
    assert evaluate_kpis(report, load_kpi(lenient))["passed"] is True
    for name in ("report.md", "report.html"):
        assert "Tasks (lm-evaluation-harness)" in (out / name).read_text()


def test_unknown_and_hub_only_tasks_exit_2_before_any_model_runs(stories_dir: Path, task_dir: Path,
                                                                 tmp_path: Path) -> None:
    out = tmp_path / "none"
    result = optcli("profile", str(stories_dir), "--tasks", "no_such_task", "--tasks-path", str(task_dir),
                    "--out", str(out))
    assert result.returncode == 2 and "no_such_task" in result.stderr and "--tasks-path" in result.stderr
    result = optcli("profile", str(stories_dir), "--tasks", "arc_easy", "--out", str(out))
    assert result.returncode == 2, result.stderr
    assert "arc_easy" in result.stderr and "--tasks-path" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not out.exists()


def test_the_harness_backend_answers_rolling_and_generation_requests_like_the_engine(stories_dir: Path) -> None:
    """loglikelihood_rolling equals the sum of the engine's own token log-probs over the text (one window
    here), and generate_until is the engine's greedy text cut at the stop string; loglikelihood's greedy
    flag holds for the engine's greedy continuation."""
    from lm_eval.api.instance import Instance

    from optcli.bench.tasks import engine_harness_lm
    from optcli.engine import Engine, SamplingParams

    engine = Engine(str(stories_dir), device="cpu", dtype="float32")
    lm = engine_harness_lm(engine)
    text = "Once upon a time, there was a little girl named Lily. She loved to play outside."
    (rolling,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    ids = lm.prefix + engine.tokenizer(text, add_special_tokens=False).input_ids
    logp = engine.score(ids).log_softmax(-1)
    assert rolling == pytest.approx(sum(logp[j - 1, ids[j]].item() for j in range(1, len(ids))), rel=1e-4)

    prompt = "Once upon a time, there was a"
    greedy = engine.generate([lm.prefix + engine.tokenizer(prompt, add_special_tokens=False).input_ids],
                             SamplingParams(max_tokens=12))[0].text
    (text_out,) = lm.generate_until([Instance("generate_until", {}, (prompt, {"until": ["\n"], "max_gen_toks": 12}), 0)])
    assert text_out == greedy.split("\n")[0] and text_out
    # the text keeps its first token's leading space (" little girl"), as a task's continuation has it
    assert greedy.startswith(" ")
    (ll,) = lm.loglikelihood([Instance("loglikelihood", {}, (prompt, " " + " ".join(greedy.split()[:3])), 0)])
    (other,) = lm.loglikelihood([Instance("loglikelihood", {}, (prompt, " purple rocket ship"), 0)])
    assert ll[1] is True and other[1] is False and other[0] < ll[0] < 0
