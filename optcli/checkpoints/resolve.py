"""MODEL specs → a local Hugging Face directory → (model, tokenizer).

Every spec is first resolved to a directory on disk, so the rest of the pipeline (llm-compressor
reads the config back from disk; manifests hash the weight files) sees one kind of model:
- a local HF directory (safetensors only; pickled checkpoints are refused),
- a hub id, looked up in the local cache and then online (a clear error when offline),
- ``builtin:tiny-llama``: a small Llama trained on the project's own corpus by
  ``optcli/builtin/train_tiny_llama.py``, shipped as package data (read-only, never rebuilt).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from optcli.builtin import model_dir
from optcli.errors import UsageError

BUILTIN_MODELS = ("tiny-llama",)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class ModelSource:
    """A resolved MODEL spec: what the user typed and the directory it stands for."""

    spec: str
    path: Path


def resolve_model(spec: str) -> ModelSource:
    if spec.startswith("builtin:"):
        name = spec.split(":", 1)[1]
        if name not in BUILTIN_MODELS:
            raise UsageError(f"unknown builtin model '{name}' (available: {', '.join(BUILTIN_MODELS)})")
        return ModelSource(spec, _builtin_dir(name))
    path = Path(spec).expanduser()
    if path.exists():
        _check_model_dir(path)
        return ModelSource(spec, path.resolve())
    if _HUB_ID.match(spec) and not spec.startswith((".", "/", "~")):
        return ModelSource(spec, _download_from_hub(spec))
    raise UsageError(f"model directory not found: {spec}")


def _check_model_dir(path: Path) -> None:
    if not path.is_dir():
        raise UsageError(f"model path is not a directory: {path}")
    if not (path / "config.json").is_file():
        raise UsageError(f"{path}: no config.json (not a Hugging Face model directory)")
    if not list(path.glob("*.safetensors")):
        pickled = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
        hint = f" (found {pickled[0]}: pickled checkpoints are not loaded; convert to safetensors)" if pickled else ""
        raise UsageError(f"{path}: no .safetensors weights{hint}")
    for weights in path.glob("*.safetensors"):
        _check_safetensors_header(weights)


def _check_safetensors_header(path: Path) -> None:
    """Catch truncated or corrupt files up front, with the file's name, not deep in a loader."""
    size = path.stat().st_size
    try:
        with path.open("rb") as fh:
            header_len = int.from_bytes(fh.read(8), "little")
            if size < 8 or header_len <= 0 or 8 + header_len > size:
                raise ValueError("header length out of range")
            header = json.loads(fh.read(header_len))
    except (ValueError, UnicodeDecodeError):
        raise UsageError(f"{path}: corrupt safetensors file (unreadable header)") from None
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if 8 + header_len + end > size:
        raise UsageError(f"{path}: truncated safetensors file ({size} bytes, header needs {8 + header_len + end})")
    _check_safetensors_dtypes(path, header)


def _check_safetensors_dtypes(path: Path, header: dict) -> None:
    """safetensors' own reader validates the rest of the header (dtypes, shapes against offsets): ask it
    here, where a refusal names the file and tensor, instead of deep in a loader (numpy: no torch import)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy"):
            pass
    except SafetensorError as exc:
        message = str(exc).splitlines()[0]
        unknown = re.search(r"unknown variant `([^`]*)`", message)
        if unknown is None:
            raise UsageError(f"{path}: corrupt safetensors file ({message})") from None
        dtype = unknown[1]
        name = next((k for k, t in header.items() if isinstance(t, dict) and t.get("dtype") == dtype), "?")
        raise UsageError(f"{path}: tensor '{name}' has dtype '{dtype}', which safetensors does not know") from None


def _download_from_hub(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import RepositoryNotFoundError

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached: try the network next
        pass
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except RepositoryNotFoundError:
        raise UsageError(f"model '{repo_id}' not found on the Hugging Face hub") from None
    except Exception as exc:  # noqa: BLE001 - offline, DNS, timeouts, gated repos: all "unreachable" to the user
        raise UsageError(
            f"cannot reach the Hugging Face hub to fetch '{repo_id}' ({type(exc).__name__}); "
            "download it elsewhere and pass its local directory as MODEL"
        ) from None


def load_model(source: ModelSource, dtype: str = "float32", device: str = "cpu", trust_remote_code: bool = False):
    """Load model and tokenizer from a resolved directory; safetensors only."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source.path, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            source.path,
            dtype=getattr(torch, dtype),
            use_safetensors=True,
            trust_remote_code=trust_remote_code,
        )
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise UsageError(f"{source.path}: the model needs custom code; pass --trust-remote-code if you trust it") from None
        raise UsageError(f"{source.path}: cannot load model ({str(exc).splitlines()[0]})") from None
    except OSError as exc:
        raise UsageError(f"{source.path}: cannot load model ({str(exc).splitlines()[0]})") from None
    model.eval()
    return model.to(device), tokenizer


def weight_hashes(path: Path) -> dict[str, str]:
    """sha256 of each weight file: ties an artifact to the exact source it was made from."""
    hashes = {}
    for weights in sorted(path.glob("*.safetensors")):
        digest = hashlib.sha256()
        with weights.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                digest.update(chunk)
        hashes[weights.name] = digest.hexdigest()
    return hashes


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of the vocabulary and merges: two tokenizers agree on ids iff this matches."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        payload = json.dumps({"model": spec.get("model"), "added": spec.get("added_tokens")}, sort_keys=True)
    else:
        payload = json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


# --- builtin:tiny-llama -------------------------------------------------------------------------


def _builtin_dir(name: str) -> Path:
    path = model_dir(name)
    if not (path / "config.json").is_file() or not list(path.glob("*.safetensors")):
        raise RuntimeError(f"optcli's package data is incomplete: builtin:{name} not found in {path} (reinstall optcli)")
    return path
