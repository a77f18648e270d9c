"""Measurements for `optcli profile`: the workload (`workload.py`), one model's speed through the
engine or against an endpoint (`measure.py`, with the load generator in `load_generator.py`, its
metrics in `metrics.py` and prompts in `prompts.py`), accuracy against a baseline (`accuracy.py`),
the source-vs-artifact comparison and roofline (`comparison.py`), KPI gates (`kpi.py`), and the
whole profile run that ties them together and writes the report (`profile.py`).

bench may import engine, calibration (its held-out text), checkpoints, report, roi (cost, hardware),
config, errors and util; never cli, serve or quantize.
"""
