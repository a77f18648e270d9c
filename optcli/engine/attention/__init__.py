"""Attention over the paged KV cache, one file per backend: `layout.py` holds the backend-neutral
StepLayout (what a step attends) and block-table packing, `cpu.py` the CPU gather + SDPA path,
`triton.py` the metadata and calls for the Triton kernels, `rope.py` RoPE's rotation (the layer's and an 8-bit
cache's centre's). A shared lower room: engine core and
engine.models import it; it imports only engine.kernels (lazily, since triton is optional), never
models, quant or engine core."""
