"""Getting a model into the engine: `model.py` turns a MODEL spec into our forward, tokenizer and EOS
ids; `state_dict.py` reads an artifact's tensors (dense, compressed-tensors, bitsandbytes) into a
state dict. Sits above engine.models and engine.quant (it builds the one and reads the other's
checkpoint formats) and below engine core, which calls load_engine_model."""
