"""The one atomic directory writer: a killed writer's temporary is removed by the next write (and
said so on stderr), a live writer's and anything not ours are left alone, --force swaps only a
complete directory in."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from optcli.errors import UsageError
from optcli.report import write_reports
from optcli.util import fs

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
KILLED_WRITER = """
import os, sys
from pathlib import Path
from optcli.util.fs import atomic_directory
with atomic_directory(Path(sys.argv[1])) as tmp:
    (tmp / "half-written.bin").write_bytes(b"x" * 1000)
    os.kill(os.getpid(), 9)
"""
LIVE_WRITER = """
import sys, time
from pathlib import Path
from optcli.util.fs import atomic_directory
with atomic_directory(Path(sys.argv[1])) as tmp:
    print(tmp, flush=True)
    time.sleep(60)
"""


def temporaries(parent: Path, name: str) -> list[Path]:
    return sorted(parent.glob(f".tmp-{name}-*"))


KIND = fs.OutputKind("test output", "output.json", ("text",))  # what `write` writes: --force may replace it


def write(out: Path, text: str = "new", force: bool = False) -> None:
    with fs.atomic_directory(out, force, KIND) as tmp:
        (tmp / "file.txt").write_text(text)
        (tmp / "output.json").write_text(json.dumps({"text": text}))


def owner_pid(tmp: Path) -> int:
    return json.loads((tmp / fs.OWNER_FILE).read_text())["pid"]


def test_sigkilled_writers_temporary_is_removed_by_the_next_write_and_logged(tmp_path: Path, caplog) -> None:
    out = tmp_path / "artifact"
    killed = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(out)], env=ENV, capture_output=True, timeout=60)
    assert killed.returncode == -9, killed.stderr
    [left] = temporaries(tmp_path, "artifact")
    assert not out.exists() and (left / "half-written.bin").exists()
    pid = owner_pid(left)
    with caplog.at_level(logging.WARNING, logger="optcli"):
        write(out)
    assert (out / "file.txt").read_text() == "new" and not (out / fs.OWNER_FILE).exists()
    assert temporaries(tmp_path, "artifact") == []
    [record] = [r for r in caplog.records if r.name == "optcli"]
    assert record.levelno == logging.WARNING
    assert record.getMessage() == f"removed stale temporary {left.name} left by pid {pid} (no longer running)"


def test_live_writers_temporary_is_left_alone(tmp_path: Path, caplog) -> None:
    out = tmp_path / "artifact"
    child = subprocess.Popen([sys.executable, "-c", LIVE_WRITER, str(out)], env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        theirs = Path(child.stdout.readline().strip())
        assert theirs.is_dir() and owner_pid(theirs) == child.pid
        with caplog.at_level(logging.WARNING, logger="optcli"):
            write(tmp_path / "other")  # a neighbour's write
            with pytest.raises(UsageError, match="already exists"):
                write(tmp_path / "other")
            with fs.atomic_directory(tmp_path / "mine") as mine:  # our own pid owns this one
                assert fs.sweep_stale_temporaries(tmp_path / "mine") == []
                assert mine.is_dir()
        assert theirs.is_dir() and not caplog.records
    finally:
        child.kill()
        child.wait()
    assert fs.sweep_stale_temporaries(out) == [theirs]  # and once it is gone, it is swept


def test_names_not_ours_and_young_ownerless_temporaries_are_left_alone(tmp_path: Path, caplog) -> None:
    old = time.time() - 3600
    foreign = [tmp_path / ".tmp-other", tmp_path / ".tmp-artifact", tmp_path / ".tmp-artifact-x"]
    for path in foreign:
        path.mkdir()
        os.utime(path, (old, old))
    young = tmp_path / ".tmp-artifact-abcd1234"  # no owner file yet: maybe a writer that just started
    young.mkdir()
    orphan = tmp_path / ".tmp-artifact-0123abcd"  # no owner file and an hour old
    orphan.mkdir()
    os.utime(orphan, (old, old))
    neighbours = tmp_path / ".tmp-neighbour-0123abcd"  # another target's, with no owner file: not proven ours
    neighbours.mkdir()
    os.utime(neighbours, (old, old))
    with caplog.at_level(logging.WARNING, logger="optcli"):
        write(tmp_path / "artifact")
    assert all(p.is_dir() for p in [*foreign, young, neighbours]) and not orphan.exists()
    assert [r.getMessage() for r in caplog.records] == [
        f"removed stale temporary {orphan.name} left with no owner file, 3600 s old"]


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="process start times come from /proc")
def test_a_recycled_pid_is_not_mistaken_for_the_writer(tmp_path: Path, caplog) -> None:
    stale = tmp_path / ".tmp-artifact-feedf00d"
    stale.mkdir()
    me = fs._identity(os.getpid())
    (stale / fs.OWNER_FILE).write_text(json.dumps({**me, "start": "1"}))  # our pid, another start time
    with caplog.at_level(logging.WARNING, logger="optcli"):
        write(tmp_path / "artifact")
    assert not stale.exists() and "its pid now belongs to another process" in caplog.records[0].getMessage()


def test_dead_writer_of_another_target_and_a_bare_pid_owner_file(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(done.stdout)
    legacy = tmp_path / ".tmp-neighbour-k3j_x9q2"  # as earlier versions named and marked them
    legacy.mkdir()
    (legacy / fs.OWNER_FILE).write_text(str(dead))
    write(tmp_path / "artifact")
    assert not legacy.exists()


def test_force_swaps_only_a_complete_directory(tmp_path: Path) -> None:
    out = tmp_path / "artifact"
    write(out, "first")
    with pytest.raises(RuntimeError), fs.atomic_directory(out, force=True, kind=KIND) as tmp:
        (tmp / "file.txt").write_text("half")
        raise RuntimeError("killed halfway")
    assert (out / "file.txt").read_text() == "first"
    write(out, "second", force=True)
    assert (out / "file.txt").read_text() == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["artifact"]
    assert oct(out.stat().st_mode & 0o777) == oct(0o777 & ~fs._umask())  # not left private like mkdtemp's


def test_an_old_copy_that_is_the_only_copy_is_kept(tmp_path: Path, caplog) -> None:
    """Killed between the two renames of a --force swap: the previous artifact lives only in .old-*."""
    swap = tmp_path / ".old-artifact-0badc0de"
    (swap / "artifact").mkdir(parents=True)
    (swap / fs.OWNER_FILE).write_text(json.dumps({"pid": 2**22 + 12345}))  # above pid_max: not running
    with caplog.at_level(logging.WARNING, logger="optcli"):
        fs.sweep_stale_temporaries(tmp_path / "artifact")
    assert swap.is_dir() and "only copy of artifact" in caplog.records[0].getMessage()
    write(tmp_path / "artifact")
    fs.sweep_stale_temporaries(tmp_path / "artifact")
    assert not swap.exists()


def test_report_writer_uses_it_and_still_replaces_files_in_an_existing_directory(tmp_path: Path) -> None:
    out = tmp_path / "report"
    stale = tmp_path / ".tmp-report-deadbeef"
    stale.mkdir()
    (stale / fs.OWNER_FILE).write_text(json.dumps({"pid": 2**22 + 12345}))
    report = {"model": "m", "cost": {"usd_per_1k_tokens": 0.5, "usd_per_1k_output_tokens": 2.0}, "versions": {}}
    paths = write_reports(report, out)
    assert json.loads(paths["json"].read_text())["model"] == "m" and not stale.exists()
    (out / "keep.txt").write_text("other artifact")
    write_reports({**report, "model": "n"}, out)
    assert json.loads(paths["json"].read_text())["model"] == "n" and (out / "keep.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]
    (tmp_path / "file").write_text("in the way")
    with pytest.raises(UsageError, match="not a directory"):
        write_reports(report, tmp_path / "file")


# --- the one rule for what a write may replace --------------------------------------------------------


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_force_replaces_only_an_output_of_its_kind_or_an_empty_directory(tmp_path: Path) -> None:
    ours = tmp_path / "ours"
    write(ours, "first")
    write(ours, "second", force=True)
    assert (ours / "file.txt").read_text() == "second"
    empty = tmp_path / "empty"
    empty.mkdir()
    write(empty, force=True)
    assert (empty / "file.txt").read_text() == "new"
    users = tmp_path / "thesis"
    (users / "chapters").mkdir(parents=True)
    (users / "thesis.tex").write_text("years of work")
    (users / "chapters" / "one.tex").write_text("chapter one")
    before = snapshot(users)
    with pytest.raises(UsageError) as refused:
        write(users, force=True)
    assert snapshot(users) == before
    message = str(refused.value)
    assert str(users) in message and "2 entries (chapters, thesis.tex)" in message and "kept" in message
    assert "test output" in message
    calibration = tmp_path / "calib"  # another kind optcli writes: named as such, and kept too
    calibration.mkdir()
    (calibration / "manifest.json").write_text(json.dumps({"optcli_version": "0", "tokenizer_hash": "t", "sha256": "s"}))
    with pytest.raises(UsageError, match="holds a calibration set, not a quantized artifact: kept"):
        fs.check_out_dir(calibration, True, fs.ARTIFACT)
    assert (calibration / "manifest.json").exists()


@pytest.mark.parametrize(("out", "says"), [("models/llama", "is the source model"),
                                           ("models", "contains the source model"),
                                           ("models/llama/original", "is inside the source model")])
def test_force_never_touches_an_input_of_the_run(tmp_path: Path, out: str, says: str) -> None:
    """Even where the rule by kind would allow it (the source here is itself an output of this kind)."""
    source = tmp_path / "models" / "llama"
    write(source, "the source")
    (source / "original").mkdir()
    before = snapshot(tmp_path / "models")
    with pytest.raises(UsageError, match=says), fs.atomic_directory(tmp_path / out, True, KIND, {"source model": source}):
        pytest.fail("the block ran")
    assert snapshot(tmp_path / "models") == before and (source / "original").is_dir()


def test_a_symlinked_out_is_refused_and_its_target_kept(tmp_path: Path) -> None:
    target = tmp_path / "target"
    write(target, "theirs")
    link = tmp_path / "link"
    link.symlink_to(target)
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    for out in (link, dangling):
        with pytest.raises(UsageError, match="is a symbolic link"):
            write(out, force=True)
        assert out.is_symlink()
    assert (target / "file.txt").read_text() == "theirs" and not (tmp_path / "nowhere").exists()


def test_a_place_that_cannot_be_written_is_refused_before_the_work(tmp_path: Path) -> None:
    """Checked by trying, not by permission bits (which do not stop root): a regular file where a directory
    of the path should be, and /proc, where even root cannot create anything."""
    (tmp_path / "notes.txt").write_text("mine")
    cases = [(tmp_path / "notes.txt" / "out", "notes.txt is a file, not a directory"),
             (tmp_path / "notes.txt" / "a" / "b", "notes.txt is a file, not a directory"),
             (Path("/proc/optcli-test/out"), "/proc is not writable")]
    for out, says in cases:
        with pytest.raises(UsageError, match=says), fs.atomic_directory(out):
            pytest.fail("the block ran")
        with pytest.raises(UsageError, match=says):
            write_reports({"model": "m", "versions": {}}, out)
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]  # and the probe left nothing behind


def test_the_report_writer_replaces_only_report_files_it_wrote(tmp_path: Path) -> None:
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "report.md").write_text("my own report")
    with pytest.raises(UsageError, match="report.md not written by optcli"):
        write_reports({"model": "m", "versions": {}}, notes)
    assert snapshot(notes) == {"report.md": b"my own report"}


def test_a_file_output_replaces_only_a_file_of_its_kind(tmp_path: Path) -> None:
    dataset = tmp_path / "prompts.jsonl"
    dataset.write_text('{"prompt": "hello"}\n')
    with pytest.raises(UsageError, match="prompts.jsonl: exists and is not an earlier export: kept"):
        fs.check_out_file(dataset, "--export", "an earlier export", lambda path: False)
    fs.check_out_file(dataset, "--export", "an earlier export", lambda path: True)
    with pytest.raises(UsageError, match="exists and is not a file"):
        fs.check_out_file(tmp_path, "--export", "an earlier export", lambda path: True)


SCRATCH_KILLED = """
import os
from optcli.util.fs import scratch_directory
with scratch_directory("optcli-test-") as spill:
    (spill / "0.pt").write_bytes(b"x" * 100)
    os.kill(os.getpid(), 9)
"""


def test_scratch_directories_of_dead_runs_are_removed_and_live_ones_kept(tmp_path: Path, monkeypatch,
                                                                         caplog) -> None:
    env = {**ENV, "TMPDIR": str(tmp_path)}
    killed = subprocess.run([sys.executable, "-c", SCRATCH_KILLED], env=env, capture_output=True, timeout=60)
    assert killed.returncode == -9, killed.stderr
    [left] = tmp_path.glob("optcli-test-*")
    pid = owner_pid(left)
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="optcli"), fs.scratch_directory("optcli-test-") as mine:
        assert not left.exists() and mine.is_dir() and mine.parent == tmp_path
        with fs.scratch_directory("optcli-test-") as nested:  # ours is alive: not swept by a neighbour
            assert mine.is_dir() and nested != mine
    assert list(tmp_path.glob("optcli-test-*")) == []
    assert [r.getMessage() for r in caplog.records] == [f"removed stale temporary {left} left by pid {pid} (no longer running)"]
