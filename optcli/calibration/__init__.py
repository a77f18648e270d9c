"""Calibration sets for the quantizers: the built-in corpus (`corpus.py`), the sources a set can be
read from — files, directories, saved datasets, the hub, the model's own generations
(`sources.py`) — building, saving and loading a hashed set (`dataset.py`), and the activation-outlier
statistics behind `calibrate --stats` (`outliers.py`).

calibration may import engine (the `self` source generates text with it), checkpoints, builtin,
config, errors and util; never cli, bench, serve, quantize or roi.
"""
