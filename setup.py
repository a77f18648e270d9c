"""Only what pyproject.toml cannot say: `recipes/` and `calibration_data/` live at the top of the repository
(the design's layout) and ship inside the package, as `optcli/builtin/recipes/` and
`optcli/builtin/calibration_data/`, where `optcli.builtin` finds them in an installed wheel (a checkout reads
them at the top level). Everything else is in pyproject.toml."""

from setuptools import find_packages, setup

TOP_LEVEL_DATA = {"optcli.builtin.recipes": "recipes", "optcli.builtin.calibration_data": "calibration_data"}

setup(packages=[*find_packages(include=["optcli", "optcli.*"]), *TOP_LEVEL_DATA], package_dir=TOP_LEVEL_DATA)
