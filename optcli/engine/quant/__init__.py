"""Quantized weights in the engine: their canonical storage classes (`weights.py`), readers for
compressed-tensors and bitsandbytes checkpoints (`checkpoint.py`), load-time rounding of a dense
checkpoint (`load_time_rounding.py`), the linear layers that compute from them (`linear.py`,
`fp8_linear.py`, `bnb_linear.py`, chosen by `layers.py`), every CPU kernel as a class (`cpu_kernels.py`),
and the rules that pick one per layer and batch-size bucket (`cpu_choice.py`; opt-in timing: `cpu_tune.py`).

quant may import engine.kernels, config, errors and util; never engine.models, engine.loading or the
engine core.
"""
