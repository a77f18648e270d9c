"""An installed optcli, not a checkout: the wheel carries its recipes, corpus and demo model.

The wheel is built from this checkout and installed into a fresh venv whose only optcli is that
wheel (its dependencies come from the test venv through a .pth line, so nothing is downloaded);
commands then run from a directory outside the repository, where `optcli/` of the checkout cannot
be imported by accident.
"""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """bin/ of a venv holding the built wheel of this checkout."""
    root = tmp_path_factory.mktemp("wheel-install")
    dist = root / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist),
                    str(REPO)], check=True, cwd=root)
    wheel = next(dist.glob("optcli-*.whl"))
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = Path(subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    (site / "test-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "--no-deps", "-q",
                    str(wheel)], check=True)
    return venv / "bin"


def _run(bin_dir: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(bin_dir / args[0]), *args[1:]], cwd=cwd, capture_output=True, text=True, timeout=600,
                          env={"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(cwd), "OPTCLI_CACHE": str(cwd / "cache")})


def test_the_wheel_is_what_runs(installed: Path, tmp_path: Path) -> None:
    where = _run(installed, "python", "-c", "import optcli; print(optcli.__file__)", cwd=tmp_path)
    assert where.returncode == 0, where.stderr
    assert str(installed.parent) in where.stdout and str(REPO) not in where.stdout


def test_installed_wheel_lists_the_shipped_recipes(installed: Path, tmp_path: Path) -> None:
    from optcli.quantize.recipes import builtin_names

    result = _run(installed, "optcli", "recipes", "list", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    names = builtin_names()
    assert len(names) == 10  # the nine of DESIGN.md plus fp8-dynamic-kv
    for name in names:
        assert name in result.stdout


def test_installed_wheel_quantizes_the_builtin_model(installed: Path, tmp_path: Path) -> None:
    out = tmp_path / "tiny-rtn"
    result = _run(installed, "optcli", "quantize", "builtin:tiny-llama", "--recipe", "w4a16-rtn", "--out", str(out),
                  "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads(result.stdout)
    assert summary["recipe"] == "w4a16-rtn"
    assert (out / "optcli.json").is_file() and list(out.glob("*.safetensors"))


def test_installed_wheel_carries_the_top_level_data(installed: Path, tmp_path: Path) -> None:
    """recipes/ and calibration_data/ live at the top of the checkout; the wheel carries them inside the package."""
    code = ("from optcli.builtin import calibration_data_dir, recipes_dir; "
            "from optcli.calibration.corpus import calibration_files; "
            "print(recipes_dir()); print(calibration_data_dir()); print(len(calibration_files()))")
    result = _run(installed, "python", "-c", code, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    recipes, calibration, files = result.stdout.split()
    for path in (recipes, calibration):
        assert path.startswith(str(installed.parent)) and str(REPO) not in path
    assert int(files) == 4
