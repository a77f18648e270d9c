"""What every command shares: the consoles, the engine options (`serve` and `profile` take the same
ones, so what profile measures is what serve runs), the error-to-exit-code guard, --json output."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from typing import Annotated

import typer
from rich.console import Console

from optcli.config import KV_CACHE_DTYPES, LM_HEADS, EngineConfig, check_dtype, check_kv_cache_dtype
from optcli.errors import KpiFailed, UsageError

out = Console()
err = Console(stderr=True)

ENGINE = EngineConfig()
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu or cuda.")]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="auto (CUDA: the checkpoint's, bf16 for fp32; CPU: bf16 where "
                                       "it is native and measured faster, else fp32), bfloat16, float16 or float32.")]
MaxNumSeqsOpt = Annotated[int, typer.Option("--max-num-seqs", min=1, help="Sequences in one batch at most.")]
MaxModelLenOpt = Annotated[int | None, typer.Option("--max-model-len", min=2, help=f"Context per sequence (default {ENGINE.max_model_len}, capped at the model's).")]
EnforceEagerOpt = Annotated[bool, typer.Option("--enforce-eager", help="No CUDA graphs.")]
GpuMemoryOpt = Annotated[float, typer.Option("--gpu-memory-utilization", min=0.05, max=1.0, help="Share of the GPU the engine may use.")]
KvCacheDtypeOpt = Annotated[str, typer.Option(
    "--kv-cache-dtype", help=f"{' | '.join(KV_CACHE_DTYPES)}: the KV cache's storage. auto: the model dtype, or the "
    "artifact's calibrated kv_cache_scheme; fp8 (= fp8_e4m3) and int8 hold twice the tokens of a 16-bit cache, "
    "with a scale per layer and KV head (the artifact's, else set by the first K/V written).")]
LmHeadOpt = Annotated[str, typer.Option("--lm-head", help="dense | int8: round the LM head (and a tied embedding) to int8 per row at load.")]


def engine_config(device: str, dtype: str, max_num_seqs: int, max_model_len: int | None, enforce_eager: bool,
                   gpu_memory_utilization: float, lm_head: str = "dense", kv_cache_dtype: str = "auto") -> EngineConfig:
    check_dtype(dtype, "--dtype")
    check_kv_cache_dtype(kv_cache_dtype, "--kv-cache-dtype")
    if lm_head not in LM_HEADS:
        raise UsageError(f"--lm-head must be one of {', '.join(LM_HEADS)} (got '{lm_head}')")
    if device not in ("auto", "cpu", "cuda") and not device.startswith("cuda:"):
        raise UsageError(f"--device must be auto, cpu or cuda (got '{device}')")
    return EngineConfig(device=device, dtype=dtype, max_num_seqs=max_num_seqs,
                        max_model_len=max_model_len or ENGINE.max_model_len, enforce_eager=enforce_eager,
                        gpu_memory_utilization=gpu_memory_utilization, lm_head=lm_head, kv_cache_dtype=kv_cache_dtype)


def fail(message: str, code: int, as_json: bool = False) -> None:
    """One line on stderr and exit `code`; with `as_json`, also the failure as the one JSON object on
    stdout (`{"error", "exit_code"}`), so a script reading stdout always gets an object to parse."""
    err.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
    if as_json:
        emit_json({"error": message, "exit_code": code})
    raise typer.Exit(code)


@contextlib.contextmanager
def guard(as_json: bool):
    """Map library errors to exit codes; in --json mode keep stdout for the one JSON object (the result,
    or the error)."""
    try:
        with contextlib.redirect_stdout(sys.stderr) if as_json else contextlib.nullcontext():
            yield
    except UsageError as exc:
        fail(str(exc), 2, as_json)
    except KpiFailed as exc:
        fail(str(exc), 3, as_json)
    except KeyboardInterrupt:
        fail("interrupted", 130, as_json)
    except typer.Exit:
        raise
    except Exception as exc:  # noqa: BLE001 - one line for users; OPTCLI_DEBUG=1 for the traceback
        if os.environ.get("OPTCLI_DEBUG"):
            raise
        fail(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} (set OPTCLI_DEBUG=1 for details)",
             1, as_json)


def emit_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, default=str) + "\n")
    sys.stdout.flush()


def mib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.2f} MiB"


@contextlib.contextmanager
def layer_progress(description: str, as_json: bool):
    """A per-layer progress bar for people on a terminal; nothing in pipes or --json mode."""
    if as_json or not err.is_terminal:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    with Progress(
        SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=err, transient=True,
    ) as bar:
        task = bar.add_task(description, total=None)

        def advance(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total, description=f"{description} · layer {done}/{total}")

        yield advance
