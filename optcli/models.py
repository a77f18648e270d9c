"""MODEL specs → a local Hugging Face directory → (model, tokenizer).

Every spec is first resolved to a directory on disk, so the rest of the pipeline (llm-compressor
reads the config back from disk; manifests hash the weight files) sees one kind of model:
- a local HF directory (safetensors only; pickled checkpoints are refused),
- a hub id, looked up in the local cache and then online (a clear error when offline),
- ``builtin:tiny-llama``: a seeded random Llama with a BPE tokenizer trained in code on the
  project's own corpus, materialized once into the cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from optcli.errors import UsageError

BUILTIN_MODELS = ("tiny-llama",)
_BUILTIN_VERSION = "1"  # bump when the builtin model's recipe changes, so caches rebuild
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def cache_dir() -> Path:
    return Path(os.environ.get("OPTCLI_CACHE", Path.home() / ".cache" / "optcli"))


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
        return ModelSource(spec, _materialize_builtin(name))
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

TINY_LLAMA = dict(
    hidden_size=256,
    intermediate_size=768,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    max_position_embeddings=2048,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    tie_word_embeddings=True,
)
TINY_VOCAB = 1024


def _materialize_builtin(name: str) -> Path:
    target = cache_dir() / "builtin" / f"{name}-v{_BUILTIN_VERSION}"
    if (target / "config.json").is_file() and list(target.glob("*.safetensors")):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        build_tiny_llama(tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another process built it first
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def build_tiny_llama(out: Path) -> None:
    """A deterministic demo Llama: BPE tokenizer trained on calibration_data/, weights from seed 0."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = train_builtin_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **TINY_LLAMA,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id).save_pretrained(out)


def train_builtin_tokenizer():
    """Byte-fallback BPE (Llama style) trained on the calibration corpus; deterministic."""
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, trainers
    from tokenizers.models import BPE
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    from optcli.calibration import calibration_documents

    specials = ["<unk>", "<s>", "</s>"]
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    tok = Tokenizer(BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB,
        special_tokens=specials + byte_tokens,
        initial_alphabet=[],
        limit_alphabet=128,
        show_progress=False,
    )
    tok.train_from_iterator(calibration_documents(), trainer=trainer)
    tok.post_processor = TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=TINY_LLAMA["max_position_embeddings"],
    )
