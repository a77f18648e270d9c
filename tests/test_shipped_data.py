"""The data optcli ships besides code, where the design lays it out: `recipes/` and `calibration_data/` at the
top of the repository (a wheel carries them inside the package: tests/test_packaging.py), and the calibration
set's manifest true to its files."""

from __future__ import annotations

import ast
import hashlib
import json
from pathlib import Path

from optcli.builtin import CHECKOUT, calibration_data_dir, recipes_dir
from optcli.calibration.corpus import calibration_files, read_documents
from optcli.calibration.sources import builtin_documents

REPO = Path(__file__).resolve().parents[1]


def test_a_checkout_reads_the_top_level_directories():
    assert CHECKOUT == REPO
    assert recipes_dir() == REPO / "recipes" and calibration_data_dir() == REPO / "calibration_data"
    # No copy inside the package that would shadow them (a recipe added there would be read instead).
    assert not (REPO / "optcli" / "builtin" / "recipes").exists()
    assert not (REPO / "optcli" / "builtin" / "calibration_data").exists()


def test_setup_py_ships_both_from_the_top_level():
    tree = ast.parse((REPO / "setup.py").read_text(encoding="utf-8"))
    mapping = next(ast.literal_eval(n.value) for n in tree.body
                   if isinstance(n, ast.Assign) and n.targets[0].id == "TOP_LEVEL_DATA")
    assert mapping == {"optcli.builtin.recipes": "recipes", "optcli.builtin.calibration_data": "calibration_data"}


def test_the_manifest_is_true_to_its_files():
    root = calibration_data_dir()
    manifest = json.loads((root / "manifest.json").read_text(encoding="utf-8"))
    entries = {f["file"]: f for f in manifest["files"]}
    assert sorted(entries) == sorted(p.name for p in root.glob("*.txt"))
    assert [f["file"] for f in manifest["files"]] == sorted(entries)  # the order the set is read in
    for name, entry in entries.items():
        path = root / name
        assert hashlib.sha256(path.read_bytes()).hexdigest() == entry["sha256"], f"{name} changed: update manifest.json"
        assert len(read_documents(path)) == entry["documents"], name
    assert [f["role"] for f in manifest["files"]].count("heldout") == 1
    assert {f["role"] for f in manifest["files"]} == {"calibration", "heldout"}


def test_the_default_set_is_the_calibration_files_only():
    manifest = json.loads((calibration_data_dir() / "manifest.json").read_text(encoding="utf-8"))
    calibration = [f for f in manifest["files"] if f["role"] == "calibration"]
    assert [p.name for p in calibration_files()] == [f["file"] for f in calibration]
    docs = builtin_documents()
    assert len(docs.docs) == sum(f["documents"] for f in calibration)
    assert "calibration_data/" in docs.description
