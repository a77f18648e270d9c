"""A careless user at the `optcli` command line (issue 31): every mistake below is answered at once with
exit 2 and one line on stderr naming the path (no traceback, no work done first), and no file of theirs is
changed or lost. With --json, stdout carries the failure as one `{"error", "exit_code"}` object."""

from __future__ import annotations

import functools
import json
import shutil
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path

import helpers
import pytest

from optcli.builtin import model_dir

optcli = functools.partial(helpers.optcli, timeout=300)


def snapshot(*roots: Path) -> dict[str, object]:
    """Every file under `roots` (bytes) and every link (its target): what must survive a refused run."""
    seen: dict[str, object] = {}
    for root in roots:
        for path in [root, *sorted(root.rglob("*"))] if root.is_dir() and not root.is_symlink() else [root]:
            if path.is_symlink():
                seen[str(path)] = ("link", str(path.readlink()))
            elif path.is_file():
                seen[str(path)] = path.read_bytes()
    return seen


def refused(result: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 2, one `error:` line on stderr holding every needle, no traceback; returns the line."""
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    line = " ".join(lines[0].split())
    for needle in needles:
        assert needle in line, line
    return line


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """The user's own model directory (a copy of the builtin one)."""
    path = tmp_path_factory.mktemp("user") / "models" / "llama"
    shutil.copytree(model_dir("tiny-llama"), path)
    return path


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, source: Path) -> Path:
    out = tmp_path_factory.mktemp("artifacts") / "llama-w4a16"
    made = optcli("quantize", str(source), "-r", "w4a16-rtn", "--out", str(out), "--json")
    assert made.returncode == 0, made.stderr
    return out


# --- quantize --force never destroys what is not its own artifact ---------------------------------------


def user_files(tmp_path: Path) -> Path:
    folder = tmp_path / "thesis"
    (folder / "figures").mkdir(parents=True)
    (folder / "thesis.tex").write_text("years of work")
    (folder / "figures" / "plot.png").write_bytes(b"\x89PNG fake")
    return folder


FORCE_CASES: dict[str, Callable[[Path, Path], tuple[Path, list[str]]]] = {
    "out is the source model": lambda tmp, src: (src, ["is the source model"]),
    "out holds the source model": lambda tmp, src: (src.parent, ["contains the source model", str(src)]),
    "out is inside the source model": lambda tmp, src: (src / "q4", ["is inside the source model"]),
    "out holds the user's files": lambda tmp, src: (user_files(tmp), ["holds 2 entries (figures, thesis.tex)",
                                                                      "not a quantized artifact", "kept"]),
}


@pytest.mark.parametrize("case", FORCE_CASES)
def test_quantize_force_keeps_what_is_not_its_artifact(tmp_path: Path, source: Path, case: str) -> None:
    out, needles = FORCE_CASES[case](tmp_path, source)
    before = snapshot(source.parent, tmp_path)
    line = refused(optcli("quantize", str(source), "-r", "w4a16-rtn", "--out", str(out), "--force"), *needles)
    assert str(out) in line
    assert snapshot(source.parent, tmp_path) == before


def test_quantize_force_refuses_a_symlinked_out(tmp_path: Path, source: Path) -> None:
    target = user_files(tmp_path)
    link = tmp_path / "link"
    link.symlink_to(target)
    before = snapshot(target, link)
    refused(optcli("quantize", str(source), "-r", "bf16", "--out", str(link), "--force"), str(link), "symbolic link")
    assert snapshot(target, link) == before and link.is_symlink()


def test_calibrate_force_keeps_the_source_it_reads(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "stories.txt").write_text("Once upon a time there was a cat.\n\nThe dog ran home.\n")
    before = snapshot(corpus)
    refused(optcli("calibrate", "--model", "builtin:tiny-llama", "--source", str(corpus), "--out", str(corpus),
                   "--force", "--samples", "2", "--seq-len", "8"), str(corpus), "is the calibration source")
    assert snapshot(corpus) == before


# --- output locations are checked before any work -------------------------------------------------------


def test_outputs_under_a_file_or_in_an_unwritable_place_are_refused_at_once(tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    under = notes / "out"
    refused(optcli("quantize", "builtin:tiny-llama", "-r", "bf16", "--out", str(under)),
            str(under), f"{notes} is a file, not a directory")
    refused(optcli("convert", "llama2c", str(tmp_path / "missing.bin"), "--tokenizer", str(tmp_path / "tok.bin"),
                   "--out", str(under)), f"{notes} is a file")
    # profile: refused before it measures anything (no report, nothing printed on stdout)
    refused(optcli("profile", "builtin:tiny-llama", "--out", str(under)), str(under), f"{notes} is a file")
    refused(optcli("profile", "builtin:tiny-llama", "--export", "/proc/optcli-careless/requests.jsonl"),
            "/proc/optcli-careless/requests.jsonl", "/proc is not writable")
    trace = tmp_path / "trace.csv"
    trace.write_text("time,requests_per_s\n00:00,10\n01:00,45\n")
    refused(optcli("roi", "--gpu-hour-cost", "2", "--p95-slo-ms", "250", "--load-trace", str(trace),
                   "--plot", str(notes / "replay.png")), str(notes / "replay.png"), f"{notes} is a file")
    assert notes.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "trace.csv"]


def test_file_outputs_do_not_overwrite_the_inputs(tmp_path: Path) -> None:
    dataset = tmp_path / "prompts.jsonl"
    dataset.write_text('{"prompt": "Once upon a time"}\n{"prompt": "The dog"}\n')
    trace = tmp_path / "trace.csv"
    trace.write_text("time,requests_per_s\n00:00,10\n01:00,45\n")
    report_md = tmp_path / "mine"
    report_md.mkdir()
    (report_md / "report.md").write_text("my own notes")
    before = snapshot(tmp_path)
    refused(optcli("profile", "builtin:tiny-llama", "--dataset", str(dataset), "--export", str(dataset)),
            f"--export {dataset}", "not an earlier export", "kept")
    refused(optcli("roi", "--gpu-hour-cost", "2", "--p95-slo-ms", "250", "--load-trace", str(trace),
                   "--plot", str(trace)), f"--plot {trace}", "not a PNG image")
    refused(optcli("profile", "builtin:tiny-llama", "--out", str(report_md)), str(report_md), "report.md",
            "not written by optcli")
    assert snapshot(tmp_path) == before


# --- bad input: exit 2 naming the file (and line), not a raw exception -----------------------------------


def test_unscorable_eval_text_is_named(tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    binary = tmp_path / "weights.bin"
    binary.write_bytes(b"text then \xd0\x00\xff binary")
    for path, says in ((empty, "no text to score"), (binary, "not UTF-8 text (byte 0xd0 at offset 10)")):
        refused(optcli("profile", "builtin:tiny-llama", "--baseline", "builtin:tiny-llama", "--eval-text", str(path)),
                f"--eval-text {path}", says)


def test_a_dataset_row_with_an_empty_prompt_is_named_with_its_line(tmp_path: Path) -> None:
    dataset = tmp_path / "prompts.jsonl"
    dataset.write_text('{"prompt": "Once upon a time"}\n\n{"prompt": ""}\n')
    refused(optcli("profile", "builtin:tiny-llama", "--dataset", str(dataset)), f"--dataset {dataset}: line 3",
            "prompt is empty")


def test_requantizing_an_artifact_names_its_source(tmp_path: Path, artifact: Path, source: Path) -> None:
    before = snapshot(artifact)
    refused(optcli("quantize", str(artifact), "-r", "w4a16-rtn", "--out", str(tmp_path / "again")),
            str(artifact), "already quantized (optcli recipe w4a16-rtn)", f"quantize its source instead ({source})")
    assert snapshot(artifact) == before and not (tmp_path / "again").exists()


def test_a_safetensors_header_with_an_unknown_dtype_is_named(tmp_path: Path, source: Path) -> None:
    model = tmp_path / "odd"
    shutil.copytree(source, model)
    data = (model / "model.safetensors").read_bytes()
    size = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + size])
    header["model.norm.weight"]["dtype"] = "Q9"
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    (model / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + size :])
    refused(optcli("quantize", str(model), "-r", "w4a16-rtn", "--out", str(tmp_path / "q")),
            f"{model / 'model.safetensors'}: tensor 'model.norm.weight' has dtype 'Q9'")


# --- --json: the failure is the one object on stdout -----------------------------------------------------


def test_json_failures_print_one_error_object(tmp_path: Path, source: Path) -> None:
    for args, code in ((["quantize", str(source), "-r", "bf16", "--out", str(source), "--force", "--json"], 2),
                       (["quantize", "-r", "bf16", "--json"], 2),  # click's own usage error: a missing MODEL
                       (["roi", "--report", str(tmp_path / "missing.json"), "--json"], 2)):
        result = optcli(*args)
        assert result.returncode == code, result.stderr
        assert result.stdout.count("\n") == 1, result.stdout
        error = json.loads(result.stdout)
        assert set(error) == {"error", "exit_code"} and error["exit_code"] == code and error["error"]
        assert "Traceback" not in result.stderr
