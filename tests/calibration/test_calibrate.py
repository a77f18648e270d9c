"""`optcli calibrate`: every source kind, selection and its hash, bad input, --stats, and quantize using the set."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from pathlib import Path

import pytest
from helpers import optcli, shared_data
from typer.testing import CliRunner

from optcli.calibration.dataset import build_from_source, calibrate, load_calibration_set
from optcli.errors import UsageError


@pytest.fixture(scope="module")
def tokenizer(stories_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(stories_dir)


@pytest.fixture(scope="module")
def stories() -> list[str]:
    """Forty real TinyStories documents, short and long."""
    text = shared_data("tinystories_train_sample.txt").read_text(encoding="utf-8")
    return [d for d in text.split("\n\n") if d.strip()][:40]


def decoded(tokenizer, calib) -> str:
    return " ".join(tokenizer.decode(ids) for ids in calib.input_ids)


def write_source(kind: str, root: Path, docs: list[str]) -> Path:
    rows = [{"id": i, "text": d} for i, d in enumerate(docs)]
    if kind == "txt":
        path = root / "docs.txt"
        path.write_text("\n\n".join(docs), encoding="utf-8")
    elif kind == "jsonl":
        path = root / "docs.jsonl"
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    elif kind == "json":
        path = root / "docs.json"
        path.write_text(json.dumps({"data": rows}), encoding="utf-8")
    elif kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = root / "docs.parquet"
        pq.write_table(pa.Table.from_pylist(rows), path)
    elif kind == "csv":
        import csv

        path = root / "docs.csv"
        with path.open("w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=["id", "text"])
            writer.writeheader()
            writer.writerows(rows)
    elif kind == "dir":
        path = root / "corpus"
        (path / "nested").mkdir(parents=True)
        half = len(docs) // 2
        (path / "a.txt").write_text("\n\n".join(docs[:half]), encoding="utf-8")
        (path / "nested" / "b.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs[half:]))
        (path / "notes.md").write_text("not calibration data")
    elif kind == "saved":
        from datasets import Dataset

        path = root / "saved"
        Dataset.from_list(rows).save_to_disk(str(path))
    return path


@pytest.mark.parametrize("kind", ["txt", "jsonl", "json", "parquet", "csv", "dir", "saved"])
def test_every_file_source_kind(tmp_path: Path, tokenizer, stories: list[str], kind: str) -> None:
    docs = [*stories, stories[0], "   "]  # a duplicate and an empty one
    calib = build_from_source(tokenizer, str(write_source(kind, tmp_path, docs)), 8, 64, seed=1)
    m = calib.manifest
    if kind == "txt":  # blank-line splitting never yields the empty one
        assert m["documents_read"] == 41 and m["documents_dropped"] == {"duplicate": 1}
    else:
        assert m["documents_read"] == 42 and m["documents_dropped"] == {"duplicate": 1, "empty": 1}
    assert m["documents_used"] == 40
    assert m["samples"] == 8 and all(len(w) == 64 for w in calib.input_ids)
    assert len({tuple(w) for w in calib.input_ids}) == 8
    assert m["token_stats"]["documents"] == 40 and sum(b["count"] for b in m["token_stats"]["histogram"]) == 40
    if kind == "dir":
        assert any("notes.md" in w for w in m["warnings"])
    words = set(decoded(tokenizer, calib).split())
    assert len(words & set(" ".join(stories).split())) > 50


def test_selection_draws_short_and_long_documents(tokenizer) -> None:
    from optcli.calibration.dataset import select_windows

    short = [[1, 10 + i] for i in range(200)]  # 2 tokens each
    long = [[1] + [300 + i] * 200 for i in range(5)]  # 201 tokens each
    chosen, available = select_windows(short + long, 8, 16, seed=0)
    assert len(chosen) == 8 and available > 8
    tokens = {t for w in chosen for t in w}
    assert any(10 <= t < 210 for t in tokens) and any(t >= 300 for t in tokens)


def test_jsonl_messages_render_with_the_chat_template(tmp_path: Path, stories_dir: Path, stories: list[str]) -> None:
    from transformers import AutoTokenizer

    rows = [{"messages": [{"role": "user", "content": s[:80]}, {"role": "assistant", "content": s[80:200]}]}
            for s in stories[:12]] + [{"messages": "not a list"}]
    source = tmp_path / "chat.jsonl"
    source.write_text("\n".join(json.dumps(r) for r in rows))
    plain = AutoTokenizer.from_pretrained(stories_dir)
    with pytest.raises(UsageError, match="no chat template"):
        build_from_source(plain, str(source), 4, 32)
    model = tmp_path / "chatty"
    shutil.copytree(stories_dir, model)
    (model / "chat_template.jinja").write_text(
        "{% for m in messages %}{{ bos_token }}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
    chatty = AutoTokenizer.from_pretrained(model)
    for flag in (False, True):  # auto-detected without a text field, and asked for
        calib = build_from_source(chatty, str(source), 4, 32, chat_template=flag)
        assert calib.manifest["documents_dropped"] == {"invalid messages": 1}
        assert "user:" in decoded(chatty, calib) and "assistant:" in decoded(chatty, calib)
        assert calib.input_ids[0].count(chatty.bos_token_id) <= 3  # the template's BOS only, not doubled


def test_hub_source_parses_name_config_split(monkeypatch, tokenizer, stories: list[str]) -> None:
    import datasets

    calls = []

    def fake_load(name, config=None, split=None):
        calls.append((name, config, split))
        return datasets.Dataset.from_dict({"story": stories})

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    calib = build_from_source(tokenizer, "hf:roneneldan/TinyStories:default:validation", 4, 64, text_field="story")
    assert calls == [("roneneldan/TinyStories", "default", "validation")]
    assert calib.manifest["samples"] == 4 and calib.manifest["documents_read"] == 40
    build_from_source(tokenizer, "hf:roneneldan/TinyStories", 4, 64, text_field="story")
    assert calls[-1] == ("roneneldan/TinyStories", None, "train")
    with pytest.raises(UsageError, match="no field 'text'.*story"):
        build_from_source(tokenizer, "hf:roneneldan/TinyStories", 4, 64)


def test_hub_source_offline_exits_2(tmp_path: Path, stories_dir: Path) -> None:
    out = tmp_path / "calib"
    result = optcli("calibrate", "--model", str(stories_dir), "--source", "hf:roneneldan/TinyStories", "--out", str(out),
                    env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    assert_usage_error(result, "cannot load hub dataset 'roneneldan/TinyStories'", "offline")
    assert not out.exists() and not list(tmp_path.glob(".tmp-*"))


def test_builtin_source(tokenizer) -> None:
    calib = build_from_source(tokenizer, "builtin", 8, 128)
    assert calib.manifest["documents_read"] == 165 and calib.manifest["samples"] == 8
    assert calib.manifest["source"].startswith("builtin")


def test_self_source_samples_from_the_model(stories_dir: Path, tokenizer) -> None:
    calib = build_from_source(tokenizer, "self", 4, 48, seed=3, model_path=stories_dir)
    assert calib.manifest["samples"] == 4 and all(len(w) == 48 for w in calib.input_ids)
    assert sum(w[0] == tokenizer.bos_token_id for w in calib.input_ids) >= 1
    again = build_from_source(tokenizer, "self", 4, 48, seed=3, model_path=stories_dir)
    assert again.manifest["sha256"] == calib.manifest["sha256"]
    other = build_from_source(tokenizer, "self", 4, 48, seed=4, model_path=stories_dir)
    assert other.manifest["source_sha256"] != calib.manifest["source_sha256"]
    text = decoded(tokenizer, calib)
    assert sum(word in text for word in ("the", "was", "and", "She", "He")) >= 3  # a trained model writes stories


def test_manifest_hash_is_stable_and_tracks_every_input(tmp_path: Path, tokenizer, stories: list[str]) -> None:
    from optcli.checkpoints.resolve import load_model, resolve_model

    source = tmp_path / "a.txt"
    source.write_text("\n\n".join(stories))

    def digest(path=source, tok=tokenizer, **kw) -> str:
        args = {"samples": 6, "seq_len": 64, "seed": 0, **kw}
        return build_from_source(tok, str(path), args["samples"], args["seq_len"], args["seed"]).manifest["sha256"]

    base = digest()
    assert digest() == base
    changed = tmp_path / "b.txt"
    changed.write_text("\n\n".join(stories).replace("Lily", "Lola"))
    _, other_tok = load_model(resolve_model("builtin:tiny-llama"))
    variants = [digest(path=changed), digest(seed=1), digest(samples=5), digest(seq_len=63), digest(tok=other_tok)]
    assert base not in variants and len(set(variants)) == len(variants)


def assert_usage_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert result.stdout == ""


def bad_sources(root: Path) -> dict[str, tuple[list[str], list[str]]]:
    (root / "empty.txt").write_bytes(b"")
    (root / "blank.txt").write_text("\n\n   \n\n")
    (root / "fields.jsonl").write_text('{"body": "Once upon a time", "id": 1}\n')
    (root / "latin1.txt").write_bytes("Caf\xe9 au lait, a story.\n".encode("latin-1"))
    (root / "few.txt").write_text("One tiny story about a cat.\n\nAnother tiny story about a dog.")
    (root / "data.xlsx").write_bytes(b"PK")
    return {
        "empty file": (["--source", str(root / "empty.txt")], ["empty.txt", "empty file"]),
        "no usable text": (["--source", str(root / "blank.txt")], ["no usable text"]),
        "missing field": (["--source", str(root / "fields.jsonl"), "--text-field", "content"],
                          ["no field 'content'", "fields: body, id"]),
        "encoding": (["--source", str(root / "latin1.txt")], ["latin1.txt", "not UTF-8"]),
        "strict": (["--source", str(root / "few.txt"), "--samples", "50", "--seq-len", "8", "--strict"],
                   ["fewer than --samples 50", "--strict"]),
        "seq-len": (["--source", "builtin", "--seq-len", "1024"], ["--seq-len 1024", "context (512"]),
        "type": (["--source", str(root / "data.xlsx")], ["unsupported", ".xlsx"]),
        "missing source": (["--source", str(root / "nope.txt")], ["not found", "nope.txt"]),
        "hub spec": (["--source", "hf:a:b:c:d"], ["hf:NAME[:CONFIG][:SPLIT]"]),
    }


def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path: Path, stories_dir: Path) -> None:
    from optcli.cli import app

    runner = CliRunner()
    for name, (args, needles) in bad_sources(tmp_path).items():
        out = tmp_path / f"out-{name}"
        result = runner.invoke(app, ["calibrate", "--model", str(stories_dir), "--out", str(out), *args])
        assert result.exit_code == 2, (name, result.stderr)
        lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:"), (name, result.stderr)
        assert all(n in lines[0] for n in needles), (name, lines[0])
        assert result.stdout == "" and not out.exists(), name
    assert not list(tmp_path.glob(".tmp-*"))


def test_fewer_documents_than_samples_warns_and_uses_what_exists(tmp_path: Path, stories_dir: Path) -> None:
    from optcli.cli import app

    source = tmp_path / "few.txt"
    source.write_text("One tiny story about a cat.\n\nAnother tiny story about a dog.\n\nOne tiny story about a cat.")
    out = tmp_path / "calib"
    result = CliRunner().invoke(app, ["calibrate", "--model", str(stories_dir), "--source", str(source), "--out", str(out),
                                      "--samples", "50", "--seq-len", "8", "--json"])
    assert result.exit_code == 0, result.stderr
    manifest = json.loads(result.stdout)
    assert 0 < manifest["samples"] < 50 and manifest["documents_dropped"] == {"duplicate": 1}
    assert "warning:" in result.stderr and "fewer than --samples 50" in result.stderr
    assert json.loads((out / "manifest.json").read_text())["sha256"] == manifest["sha256"]


def test_stats_names_real_layers_with_real_numbers(tmp_path: Path, stories_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    out = tmp_path / "calib"
    result = optcli("calibrate", "--model", str(stories_dir), "--source", str(shared_data("tinystories_train_sample.txt")),
                    "--out", str(out), "--samples", "12", "--seq-len", "96", "--stats", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    suggestion = summary["stats"]["suggestion"]
    assert suggestion["recipe"] == "w4a16-gptq" and "flat" in suggestion["reason"]  # a tiny model has no big outliers
    stats = json.loads((out / "stats.json").read_text())
    assert len(stats["layers"]) == 5 * 7 and "lm_head" not in stats["layers"]
    assert stats["tokens"] == 12 * 96 and stats["batches"] == 2
    for layer in stats["layers"].values():
        for key in ("input_absmax", "input_channel_median", "outlier_ratio", "weight_absmax"):
            assert math.isfinite(layer[key]) and layer[key] > 0
        assert layer["outlier_ratio"] >= 1 and layer["weight_min"] < 0 < layer["weight_max"]
    assert summary["stats"]["worst"][0]["layer"] == stats["worst"][0] == suggestion["worst_layer"]
    assert suggestion["max_outlier_ratio"] == max(v["outlier_ratio"] for v in stats["layers"].values())
    # q_proj's input is input_layernorm(embeddings): recompute it without hooks, over every window
    model = AutoModelForCausalLM.from_pretrained(stories_dir, dtype=torch.float32).eval()
    ids = torch.tensor(load_calibration_set(out).input_ids)
    with torch.no_grad():
        x = model.model.layers[0].input_layernorm(model.model.embed_tokens(ids))
    q = stats["layers"]["model.layers.0.self_attn.q_proj"]
    assert q["input_absmax"] == pytest.approx(float(x.abs().max()), rel=1e-5)
    assert q["input_channel_median"] == pytest.approx(float(x.abs().amax(dim=(0, 1)).median()), rel=1e-5)
    assert q["weight_absmax"] == pytest.approx(float(model.model.layers[0].self_attn.q_proj.weight.abs().max()))


@pytest.mark.parametrize(("peak", "recipe"), [(45.0, "w4a16-awq"), (12.0, "w4a16-gptq"), (3.0, "w4a16-gptq")])
def test_suggestion_follows_the_worst_outlier_ratio(peak: float, recipe: str) -> None:
    from optcli.calibration.outliers import suggest_recipe

    layers = {f"model.layers.{i}.mlp.down_proj": {"outlier_ratio": r} for i, r in enumerate([2.0, peak, 1.5])}
    suggestion = suggest_recipe(layers)
    assert suggestion["recipe"] == recipe and suggestion["worst_layer"] == "model.layers.1.mlp.down_proj"
    assert ("w8a8-int8" in suggestion["alternatives"]) and f"{peak:.1f}×" in suggestion["reason"]


def test_quantize_consumes_the_set_and_refuses_another_tokenizer(tmp_path: Path, stories_dir: Path,
                                                                 stories: list[str]) -> None:
    source = tmp_path / "docs.jsonl"
    source.write_text("\n".join(json.dumps({"text": s}) for s in stories))
    calib, _ = calibrate(str(stories_dir), str(source), tmp_path / "calib", samples=8, seq_len=64)
    out = tmp_path / "gptq"
    result = optcli("quantize", str(stories_dir), "-r", "w4a16-gptq", "--calibration", str(tmp_path / "calib"),
                    "--out", str(out), "--device", "cpu", "--json")
    assert result.returncode == 0, result.stderr
    recorded = json.loads((out / "optcli.json").read_text())["calibration"]
    assert recorded["sha256"] == calib.manifest["sha256"] and recorded["samples"] == 8
    calibrate("builtin:tiny-llama", "builtin", tmp_path / "tiny-calib", samples=4, seq_len=64)
    refused = optcli("quantize", str(stories_dir), "-r", "w4a16-gptq", "--calibration", str(tmp_path / "tiny-calib"),
                     "--out", str(tmp_path / "o"), "--device", "cpu")
    assert refused.returncode == 2 and "another tokenizer" in refused.stderr
    assert not (tmp_path / "o").exists()
