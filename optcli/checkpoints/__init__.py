"""Where model weights come from: a MODEL spec (local HF directory, hub id, `builtin:tiny-llama`)
resolved to a directory on disk, with its weight hashes and tokenizer fingerprint (`resolve.py`),
and llama2.c checkpoints converted into such a directory (`llama2c.py`).

checkpoints sits below the engine: it may import builtin, config, errors and util only.
"""
