"""The compare artifact cache: a key that changes with exactly what changes the artifact, and a cache
entry another run fills meanwhile is used rather than an error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import optcli.quantize.pipeline as pipeline
from optcli.checkpoints.resolve import resolve_model
from optcli.compare import cache


@pytest.fixture
def source():
    return resolve_model("builtin:tiny-llama")


def test_the_key_follows_recipe_calibration_and_version(source, tmp_path: Path, monkeypatch) -> None:
    key = cache.artifact_key(source, "w4a16-rtn", None, 0)
    assert key == cache.artifact_key(source, "w4a16-rtn", None, 0)
    assert key != cache.artifact_key(source, "w4a16-gptq", None, 0)
    assert key != cache.artifact_key(source, "w4a16-rtn", None, 1)  # the default calibration set's seed
    recipe = tmp_path / "mine.yaml"
    recipe.write_text(Path(pipeline.load_recipe("w4a16-rtn").source).read_text())
    assert cache.artifact_key(source, str(recipe), None, 0) == key  # the same content wherever it lies
    recipe.write_text(recipe.read_text().replace("w4a16-rtn", "w4a16-rtn-mine"))
    assert cache.artifact_key(source, str(recipe), None, 0) != key
    monkeypatch.setattr(cache, "__version__", "99.0")
    assert cache.artifact_key(source, "w4a16-rtn", None, 0) != key


def test_an_entry_filled_meanwhile_by_another_run_is_used(source, tmp_path: Path, monkeypatch) -> None:
    def other_run_won(model, recipe, out, *args, **kwargs):
        Path(out).mkdir(parents=True)
        (Path(out) / "optcli.json").write_text(json.dumps({"optcli_version": "x", "recipe": {}, "source": {}}))
        raise FileExistsError(17, "appeared while it was being written", str(out))

    monkeypatch.setattr(pipeline, "quantize", other_run_won)
    entry, seconds = cache.ensure(tmp_path, source, "builtin:tiny-llama", "w4a16-rtn", None, 0, "cpu", lambda m: None)
    assert entry.hit and seconds is None and entry.path.parent == tmp_path
    again, _ = cache.ensure(tmp_path, source, "builtin:tiny-llama", "w4a16-rtn", None, 0, "cpu", lambda m: None)
    assert again.hit and again.path == entry.path


def test_a_failed_quantization_is_not_swallowed(source, tmp_path: Path, monkeypatch) -> None:
    def broken(*args, **kwargs):
        raise FileExistsError(17, "something else", "x")

    monkeypatch.setattr(pipeline, "quantize", broken)
    with pytest.raises(FileExistsError):
        cache.ensure(tmp_path, source, "builtin:tiny-llama", "w4a16-rtn", None, 0, "cpu", lambda m: None)
