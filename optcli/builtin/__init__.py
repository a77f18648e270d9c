"""What optcli ships besides code: the demo model, the default calibration set and the recipes.

- ``recipes/`` (top level of the repository): the shipped quantization recipes (YAML, validated by
  ``optcli.quantize.recipes``). A new built-in recipe is one more file there.
- ``calibration_data/`` (top level): the default calibration set, our own mixed-domain text (prose, dialogue,
  code, numbers), and ``manifest.json``, which names each file's role; ``heldout.txt`` is evaluation-only:
  never calibrated or trained on.
- ``tiny-llama/`` (here, package data): ``builtin:tiny-llama``, a small Llama trained by
  ``train_tiny_llama.py`` on the calibration set (heldout excluded), committed as safetensors with its tokenizer.

The two top-level directories are where the design lays them out; a wheel carries them inside this package
(``setup.py`` maps them to ``optcli/builtin/recipes`` and ``optcli/builtin/calibration_data``), where
``importlib.resources`` finds them. A checkout (an editable install, or ``PYTHONPATH``) has no such copy and
reads them at the top level. Nothing here imports the rest of optcli.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[2]  # the repository root, when this is a checkout


def _data_dir(name: str) -> Path:
    # A wheel or checkout installs as plain files, so the Traversable is a real directory; a zipped
    # install (zipimport) is not supported, and this says so instead of failing later.
    path = files(__name__) / name
    if not isinstance(path, Path):
        raise RuntimeError(f"optcli's package data {name}/ is not on a file system (zipped install?)")
    return path


def _top_level_dir(name: str) -> Path:
    """`name`/ as a wheel carries it (inside this package), else at the top of the checkout."""
    for path in (_data_dir(name), CHECKOUT / name):
        if path.is_dir():
            return path
    raise RuntimeError(f"optcli's {name}/ is missing: neither in the installed package nor at {CHECKOUT / name}")


def calibration_data_dir() -> Path:
    return _top_level_dir("calibration_data")


def recipes_dir() -> Path:
    return _top_level_dir("recipes")


def model_dir(name: str) -> Path:
    return _data_dir(name)
