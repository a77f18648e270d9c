"""Turning measurements into dollars and plans, for `optcli roi` (and the cost line of `profile`):
cost per 1K tokens (`cost.py`), the GPU catalog, detection and peak bandwidth (`hardware.py`, data
in `gpu_catalog.yaml`), memory planning (`planner.py`), replicas and autoscaling (`capacity.py`), the
whole analysis (`analysis.py`) and its terminal rendering (`render.py`).

roi may import quantize.recipes (a recipe's bytes per weight), checkpoints, config, errors and util;
never cli, bench, serve or engine.
"""
