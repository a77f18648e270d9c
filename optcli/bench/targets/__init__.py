"""What `profile` measures, one module per kind (`Target`, `base.py`): the built-in engine in process
(`builtin.py`), an OpenAI-compatible server (`endpoint.py`), or the artifact and its source each served by
`vllm serve` for the run (`vllm.py`). `make_target` picks one from `ProfileArgs`."""

from __future__ import annotations

import json
from pathlib import Path

from optcli.bench.args import ProfileArgs
from optcli.bench.load_generator import Server
from optcli.bench.targets.base import Measured, Target

__all__ = ["Measured", "Server", "Target", "make_target", "manifest"]


def manifest(path: Path | None) -> dict | None:
    """An artifact's optcli.json (its recipe and source), None for a plain model."""
    if path is not None and (path / "optcli.json").is_file():
        return json.loads((path / "optcli.json").read_text())
    return None


def make_target(args: ProfileArgs) -> tuple[Target, str | None, dict | None]:
    """(the target, the baseline it compares with, the artifact's manifest): an artifact's default baseline is
    its source (from its manifest)."""
    if args.target.endpoint:
        from optcli.bench.targets.endpoint import EndpointTarget

        return EndpointTarget(args), args.accuracy.baseline or args.accuracy.baseline_endpoint, None
    from optcli.checkpoints.resolve import resolve_model

    source = resolve_model(args.model)
    info = manifest(source.path)
    baseline = args.accuracy.baseline
    if baseline is None and info is not None and info.get("source", {}).get("path"):
        baseline = info["source"]["path"]
    baseline_source = resolve_model(baseline) if baseline else None
    if args.target.served:
        from optcli.bench.targets.vllm import VllmTarget

        return VllmTarget(args, source, baseline_source), baseline, info
    from optcli.bench.targets.builtin import BuiltinTarget

    return BuiltinTarget(args, source, baseline_source), baseline, info
