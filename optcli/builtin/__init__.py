"""What optcli ships besides code: the demo model, its training corpus and the recipes.

All of it is package data, found through ``importlib.resources`` so that an installed wheel (not
only a checkout) has it. Nothing here imports the rest of optcli.

- ``corpus/``: our own mixed-domain text (prose, dialogue, code, numbers); ``heldout.txt`` is
  evaluation-only: never calibrated or trained on.
- ``recipes/``: the shipped quantization recipes (YAML, validated by ``optcli.quantize.recipes``).
- ``tiny-llama/``: ``builtin:tiny-llama``, a small Llama trained by ``train_tiny_llama.py`` on
  ``corpus/`` (heldout excluded), committed as safetensors with its tokenizer.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path


def _data_dir(name: str) -> Path:
    # A wheel or checkout installs as plain files, so the Traversable is a real directory; a zipped
    # install (zipimport) is not supported, and this says so instead of failing later.
    path = files(__name__) / name
    if not isinstance(path, Path):
        raise RuntimeError(f"optcli's package data {name}/ is not on a file system (zipped install?)")
    return path


def corpus_dir() -> Path:
    return _data_dir("corpus")


def recipes_dir() -> Path:
    return _data_dir("recipes")


def model_dir(name: str) -> Path:
    return _data_dir(name)
