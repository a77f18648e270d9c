"""`optcli quantize`: a model and a recipe in, an artifact directory with an `optcli.json` manifest out.

`pipeline.py` orchestrates (inputs checked before any work, device, calibration, backend, atomic
save, manifest); one backend per file (`llmcompressor.py` for GPTQ/AWQ/SmoothQuant/FP8/SparseGPT,
`bnb.py` for NF4/LLM.int8), with llm-compressor's group-layout choice in `layout.py` and its
patches in `lc_patches.py`; recipes (the YAML schema and the shipped ones) in `recipes.py`; the
artifact directory helpers in `artifact.py`.

quantize may import calibration, checkpoints, builtin, config, errors and util; never cli, bench,
serve or roi. This `__init__` imports nothing, so `optcli recipes` and `optcli roi` read recipes
without loading torch.
"""
