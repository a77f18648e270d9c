"""What machine a measurement ran on, GPU utilization sampled through NVML where there is one, and
the GPU catalog (datasheet figures and illustrative prices) that `optcli roi` plans with.

Measured figures are never estimated: what cannot be read on this machine is None. The catalog is
data (gpu_catalog.yaml), overridable by file, and labelled as such wherever it is used.
"""

from __future__ import annotations

import os
import platform
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from optcli.errors import UsageError


def describe(device: str) -> dict:
    import psutil
    import torch

    info = {
        "device": device,
        "name": _cpu_name(),
        "memory_bytes": psutil.virtual_memory().total,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        info.update(name=props.name, memory_bytes=props.total_memory)
    return info


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


_BANDWIDTH: dict[tuple[int, int], dict] = {}  # measured host bandwidth, once per process and thread count


def measure_host_bandwidth(nbytes: int = 2**30, repeats: int = 5, fresh: bool = False) -> dict:
    """Peak host memory read bandwidth, for the batch-1 decode roofline (`bench/comparison.roofline`) and
    `benchmarks/quant_cpu.py`'s weight-read efficiency: both use this one probe.

    How: a buffer of `nbytes` (1 GiB; 512 MiB when less than 4x that is available; far bigger than any CPU
    cache) on 2 MiB pages where the OS allows (`util/huge_pages.py`, as the engine places its CPU weights),
    every page written first, read once to warm up, then `repeats` more times; GB/s = bytes read /
    seconds of the fastest pass (1e9 bytes/s), since a shared machine only ever slows a pass down. The read
    is our kernels' probe (`lowbit_read_probe` in `cpu_lowbit_float.c`: four 32-byte load streams per
    thread, dynamic 1 MiB chunks, on every usable core: affinity and cgroup quota, `engine/kernels/cpu_threads`);
    where those kernels are not built, `torch.sum` over fp32 (which also adds, so it can read lower).
    Measured once per process (per thread count; `fresh`: measured again, for a benchmark that interleaves the
    probe with its own runs, since a shared host's bandwidth drifts over minutes); `gbs` is None when there is
    not enough free memory to measure honestly. Returns {"gbs", "source", "threads"}."""
    import torch

    from optcli.engine.kernels.cpu_threads import usable_cores

    threads = usable_cores()
    key = (nbytes, threads)
    if key in _BANDWIDTH and not fresh:
        return _BANDWIDTH[key]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)  # every usable core, whatever the engine's governor chose last
    try:
        return _measure(nbytes, repeats, key)
    finally:
        torch.set_num_threads(before)


def _measure(nbytes: int, repeats: int, key: tuple[int, int]) -> dict:
    import psutil
    import torch

    from optcli.engine.kernels import cpu_lowbit
    from optcli.util.huge_pages import huge_empty

    threads = key[1]
    size = nbytes
    available = psutil.virtual_memory().available
    if available < 4 * size:
        size = 2**29
    label = f"{size / 2**30:g} GiB" if size >= 2**30 else f"{size >> 20} MiB"
    plural = "s" if threads > 1 else ""
    if available < 4 * size:
        result = {"gbs": None, "source": f"not measured: {available >> 20} MiB free is too little for a bandwidth pass"}
    elif cpu_lowbit.library() is not None:
        data = huge_empty(size).fill_(1)  # on huge pages where the OS allows, as the engine's weights
        best = min(cpu_lowbit.read_seconds(data) for _ in range(repeats + 1))
        del data
        result = {"gbs": size / best / 1e9, "source": f"measured: read probe over {label}, {threads} thread{plural}"}
    else:
        data = torch.ones(size // 4, dtype=torch.float32)
        data.sum()  # warm-up
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            data.sum()
            best = min(best, time.perf_counter() - start)
        del data
        result = {"gbs": size / best / 1e9, "source": f"measured: torch.sum over {label} fp32, {threads} thread{plural}"}
    result["threads"] = threads
    _BANDWIDTH[key] = result
    return result


def peak_bandwidth(device: str, catalog: dict | None = None) -> dict:
    """The machine's peak memory bandwidth for `device` as {"gbs", "source"}: a CUDA GPU's datasheet
    figure from the GPU catalog (None when the catalog has no entry for it), a CPU's measured
    (`measure_host_bandwidth`)."""
    if not device.startswith("cuda"):
        return measure_host_bandwidth()
    import torch

    props = torch.cuda.get_device_properties(torch.device(device))
    spec = match_catalog(props.name, props.total_memory, catalog or load_catalog())
    if spec is None:
        return {"gbs": None, "source": f"catalog: no entry matches {props.name}"}
    return {"gbs": float(spec.bandwidth_gbs), "source": f"catalog: {spec.name}"}


class GpuUtilizationSampler:
    """Samples NVML's GPU utilization in a thread; `mean()` is None where NVML or a GPU is absent."""

    def __init__(self, device_index: int = 0, interval_s: float = 0.1) -> None:
        self.samples: list[float] = []
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._handle = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(device_index)
        except Exception:  # noqa: BLE001 - no NVML, no driver, or no GPU: nothing to sample
            self._handle = None

    def __enter__(self) -> GpuUtilizationSampler:
        if self._handle is not None:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(float(self._nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu))
            time.sleep(self.interval_s)

    def mean(self) -> float | None:
        return sum(self.samples) / len(self.samples) / 100 if self.samples else None


# --- GPU catalog, detection and recipe recommendations ------------------------------------------

CATALOG_FILE = Path(__file__).with_name("gpu_catalog.yaml")
CATALOG_ENV = "OPTCLI_GPU_CATALOG"
SMALL_BATCH = 8  # at or below this many sequences per decode step, decode is memory-bound


@dataclass(frozen=True)
class GpuSpec:
    """One catalog entry: datasheet figures (dense) and an illustrative hourly price."""

    name: str
    memory_gb: float
    bandwidth_gbs: float
    bf16_tflops: float
    fp8_tflops: float | None
    int8_tops: float | None
    compute_capability: str
    hourly_usd: float
    match: tuple[str, ...] = ()
    source: str = ""
    default: bool = False  # the entry an ambiguous --gpu name (a100: 40GB or 80GB?) resolves to

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gb * 2**30)

    @property
    def capability(self) -> tuple[int, int]:
        major, _, minor = self.compute_capability.partition(".")
        return int(major), int(minor or 0)


_NUMBERS = ("memory_gb", "bandwidth_gbs", "bf16_tflops", "fp8_tflops", "int8_tops", "hourly_usd")


def _read_catalog_file(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise UsageError(f"GPU catalog {path}: cannot read ({exc.strerror})") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise UsageError(f"GPU catalog {path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise UsageError(f"GPU catalog {path}: must map GPU names to mappings of fields")
    return data


def load_catalog(path: str | Path | None = None) -> dict[str, GpuSpec]:
    """The packaged catalog, then $OPTCLI_GPU_CATALOG, then `path`: later entries merge field by field."""
    merged: dict[str, dict] = {}
    files = [CATALOG_FILE] + [Path(p) for p in (os.environ.get(CATALOG_ENV), path) if p]
    for file in files:
        for name, fields in _read_catalog_file(file).items():
            key = next((k for k in merged if _norm(k) == _norm(str(name))), str(name))
            merged[key] = {**merged.get(key, {}), **fields}
    allowed = set(GpuSpec.__dataclass_fields__) - {"name"}
    catalog = {}
    for name, fields in merged.items():
        unknown = set(fields) - allowed
        if unknown:
            raise UsageError(f"GPU catalog: {name}: unknown field '{sorted(unknown)[0]}' "
                             f"(allowed: {', '.join(sorted(allowed))})")
        missing = allowed - set(fields) - {"match", "source", "default"}
        if missing:
            raise UsageError(f"GPU catalog: {name}: missing field '{sorted(missing)[0]}'")
        for key in _NUMBERS:
            value = fields[key]
            ok = isinstance(value, int | float) and not isinstance(value, bool) and value > 0
            if not ok and not (value is None and key in ("fp8_tflops", "int8_tops")):
                raise UsageError(f"GPU catalog: {name}: field '{key}' must be a positive number (got {value!r})")
        if not isinstance(fields.get("default", False), bool):
            raise UsageError(f"GPU catalog: {name}: field 'default' must be true or false (got {fields['default']!r})")
        catalog[name] = GpuSpec(name=name, **{**fields, "compute_capability": str(fields["compute_capability"]),
                                              "match": tuple(str(m) for m in fields.get("match") or ())})
    return catalog


@dataclass(frozen=True)
class GpuChoice:
    """What a --gpu name resolved to, and how: `note` says so whenever it was not an exact name."""

    spec: GpuSpec
    query: str
    candidates: tuple[str, ...]  # every entry the name matched; more than one: the catalog default won

    @property
    def note(self) -> str | None:
        if _norm(self.query) == _norm(self.spec.name):
            return None
        why = f"catalog default of {', '.join(self.candidates)}" if len(self.candidates) > 1 else "unique prefix"
        return f"{self.query} → {self.spec.name} ({why})"


def _norm(text: str) -> str:
    """Case, '-', '_' and spaces do not distinguish GPU names: `rtx_4090`, `RTX 4090`, `rtx-4090` are one."""
    return "".join(ch for ch in text.lower() if ch not in "-_ ")


def _name_prefixes(name: str) -> set[str]:
    """Normalised prefixes of a catalog name that end at a separator: H100-80GB → {h100, h10080gb}.
    Cutting only at separators keeps `l40` (another GPU) from being taken for L40S."""
    parts = [p for p in re.split(r"[-_ ]+", name.lower()) if p]
    return {"".join(parts[:i]) for i in range(1, len(parts) + 1)}


def resolve_gpu(name: str, catalog: dict[str, GpuSpec]) -> GpuChoice:
    """A catalog entry by exact normalised name, else by unique prefix, else the catalog's marked default
    among the prefix matches; ambiguous and unknown names are usage errors that list the choices."""
    query = _norm(name)
    exact = [spec for key, spec in catalog.items() if _norm(key) == query]
    if exact:
        return GpuChoice(exact[0], name, (exact[0].name,))
    hits = [spec for key, spec in catalog.items() if query and query in _name_prefixes(key)]
    names = tuple(spec.name for spec in hits)
    defaults = [spec for spec in hits if spec.default]
    if len(hits) == 1 or len(defaults) == 1:
        return GpuChoice(hits[0] if len(hits) == 1 else defaults[0], name, names)
    if hits:
        raise UsageError(f"ambiguous GPU '{name}': matches {', '.join(names)} (name one, or mark one "
                         "'default: true' in a --gpu-catalog FILE)")
    raise UsageError(f"unknown GPU '{name}' (known: {', '.join(catalog)}; add one with --gpu-catalog FILE)")


def lookup_gpu(name: str, catalog: dict[str, GpuSpec]) -> GpuSpec:
    """The catalog entry `resolve_gpu` picks, for callers that need not say how."""
    return resolve_gpu(name, catalog).spec


def _squash(text: str) -> str:
    return "".join(ch for ch in text.lower() if ch.isalnum())


def match_catalog(device_name: str, memory_bytes: int | None, catalog: dict[str, GpuSpec]) -> GpuSpec | None:
    """The entry whose `match` substring is in the device name; ties (A100 40/80, L4/L40S) go to the
    closest memory size, then the longest match."""
    squashed = _squash(device_name)
    hits = [(spec, max(len(_squash(m)) for m in spec.match if _squash(m) in squashed))
            for spec in catalog.values() if any(_squash(m) in squashed for m in spec.match)]
    if not hits:
        return None
    memory = memory_bytes or 0
    return min(hits, key=lambda h: (abs(h[0].memory_bytes - memory) if memory else 0, -h[1]))[0]


def detect_gpu(catalog: dict[str, GpuSpec] | None = None) -> dict | None:
    """The local CUDA GPU (name, memory, compute capability, catalog entry), or None on a CPU machine."""
    import torch

    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    major, minor = torch.cuda.get_device_capability(0)
    spec = match_catalog(props.name, props.total_memory, catalog or load_catalog())
    return {"name": props.name, "memory_bytes": props.total_memory, "compute_capability": f"{major}.{minor}",
            "catalog": spec.name if spec else None}


def recommend_recipes(compute_capability: str | None, has_fp8: bool = True,
                      batch_size: int | None = None) -> list[dict]:
    """Recipes for this hardware, best first, each with the reason (rules from the seed article):
    small batches are memory-bound → 4-bit weights; Hopper (sm_90+) and Ada (sm_89) run FP8 natively;
    Ampere (sm_80-86) has INT8 tensor cores but no FP8 → W8A8-INT8 for throughput."""
    w4 = {"recipe": "w4a16-gptq", "reason": f"decode at batch <= {SMALL_BATCH} is memory-bound: 4-bit weights read "
          "~4x fewer bytes per token than BF16 (GPTQ keeps accuracy closest to BF16)"}
    small = batch_size is not None and batch_size <= SMALL_BATCH
    if compute_capability is None:
        return [{**w4, "reason": "no GPU detected: on CPU decode is memory-bound; " + w4["reason"]}]
    major, _, minor = compute_capability.partition(".")
    cc = (int(major), int(minor or 0))
    rules = []
    if cc >= (8, 9) and has_fp8:
        arch = "Hopper or later (sm_90+)" if cc >= (9, 0) else "Ada (sm_89)"
        rules.append({"recipe": "fp8-dynamic", "reason": f"{arch} has FP8 tensor cores: FP8 weights and activations "
                      "double dense FLOP/s over BF16 and halve weight bytes, near-lossless, no calibration"})
    elif cc >= (8, 0):
        rules.append({"recipe": "w8a8-int8", "reason": f"Ampere (sm_{cc[0]}{cc[1]}) has INT8 but no FP8 tensor cores: "
                      "W8A8-INT8 doubles dense throughput over BF16 at large batches"})
    rules.insert(0 if small or not rules else len(rules), w4)
    return rules
