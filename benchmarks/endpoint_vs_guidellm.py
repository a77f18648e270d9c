"""Does `optcli profile --endpoint` measure the server, or itself? Against GuideLLM on one mock server.

Starts GuideLLM's mock server (`guidellm mock-server --ttft-ms 200 --itl-ms 20`: a known time to first token
and inter-token latency), then at each level (default: 40 requests with 8 in flight, 320 with 64) runs GuideLLM
(`guidellm run`, concurrent profile, synthetic 40-token prompts, 32 output tokens) and `optcli profile
--endpoint` (the same prompt and output lengths), interleaved, both against that one server, and prints TTFT
and ITL p50 of each, their ratio, and the mock's own figures. Target (issue 32): optcli's TTFT and ITL p50
within 10% of GuideLLM's at 8 and at 64 in flight.

GuideLLM's ITL is per request (last token - first token) / (tokens - 1), its median over requests: our TPOT's
definition. Our ITL p50 is the median gap between chunks. Both are printed; the ratio is on ITL.

GuideLLM pins versions (click, multidict) other than ours, so it may live in its own virtual environment:
`--guidellm PATH` names its executable (default: `guidellm` on PATH, else .gvenv/bin/guidellm beside this
repository). `--hog N` runs N busy-loop processes during the runs (`python -c "while True: pass"`), the issue's
"busy machine".

    python benchmarks/endpoint_vs_guidellm.py
    python benchmarks/endpoint_vs_guidellm.py --levels 8:40,64:320 --repeats 2 --hog 1
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPT_TOKENS, OUTPUT_TOKENS = 40, 32


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find_guidellm(given: str | None, required: bool = True) -> str | None:
    for candidate in (given, shutil.which("guidellm"), str(ROOT / ".gvenv" / "bin" / "guidellm")):
        if candidate and Path(candidate).is_file():
            return candidate
    if not required:
        return None
    sys.exit("guidellm not found: pip install guidellm (in its own venv if its pins conflict with ours), "
             "then pass --guidellm PATH")


@contextlib.contextmanager
def mock_server(guidellm: str, ttft_ms: float, itl_ms: float):
    port = free_port()
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen([guidellm, "mock-server", "--port", str(port), "--ttft-ms", str(ttft_ms),
                             "--itl-ms", str(itl_ms)], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(url + "/health", timeout=2).read()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    sys.exit(f"the mock server did not start:\n{log.read().decode(errors='replace')[-2000:]}")
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        proc.wait(20)


@contextlib.contextmanager
def hogs(n: int):
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        yield
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(10)


def run_guidellm(guidellm: str, url: str, tokenizer: str, streams: int, requests: int, workdir: Path,
                 rampup: float) -> dict:
    out = workdir / f"guidellm-{streams}-{time.monotonic_ns()}.json"
    subprocess.run([guidellm, "run", "--backend", f"kind=openai_http,target={url},model=mock,"
                    "request_format=/v1/completions",
                    "--profile", f"kind=concurrent,streams={streams},rampup_duration={rampup}",
                    "--constraint", f"kind=max_requests,count={requests}",
                    "--data", f"kind=synthetic_text,prompt_tokens={PROMPT_TOKENS},output_tokens={OUTPUT_TOKENS}",
                    "--tokenizer", f"kind=huggingface_auto,model={tokenizer}",
                    "--output", f"kind=json,path={out}", "--disable-console"],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = json.loads(out.read_text())["benchmarks"][0]["metrics"]

    def median(name: str) -> float:
        return metrics[name]["successful"]["median"]

    return {"ttft": median("time_to_first_token_ms"), "itl": median("inter_token_latency_ms"),
            "completed": metrics["time_to_first_token_ms"]["successful"]["count"]}


def run_optcli(url: str, streams: int, requests: int, rampup: float = 0.0) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "optcli.cli", "profile", "mock", "--endpoint", url,
                           "--requests", str(requests), "--concurrency", str(streams),
                           "--prompt-len", f"{PROMPT_TOKENS}:{PROMPT_TOKENS + 1}", "--output-len", str(OUTPUT_TOKENS),
                           "--rampup", str(rampup), "--json"], check=True, capture_output=True, text=True, env=env)
    report = json.loads(proc.stdout)
    latency = report["latency_ms"]
    return {"ttft": latency["ttft"]["p50"], "itl": latency["itl"]["p50"], "tpot": latency["tpot"]["p50"],
            "completed": report["throughput"]["failures"]["total"] - report["throughput"]["failures"]["failed"]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="a test of this script: one level of 4 requests, 2 in flight, "
                        "a fast mock; without GuideLLM installed, says so and exits 0")
    parser.add_argument("--guidellm", help="the guidellm executable (default: on PATH, else .gvenv/bin/guidellm)")
    parser.add_argument("--levels", default="8:40,64:320", help="in-flight:requests pairs (default 8:40,64:320)")
    parser.add_argument("--ttft-ms", type=float, default=200.0)
    parser.add_argument("--itl-ms", type=float, default=20.0)
    parser.add_argument("--repeats", type=int, default=1, help="runs of each client per level (medians shown)")
    parser.add_argument("--hog", type=int, default=0, help="busy-loop processes running alongside")
    parser.add_argument("--rampup", type=float, default=0.0, help=(
        "seconds over which both clients start their first requests (GuideLLM's rampup_duration, optcli's "
        "--rampup): the same offered load. At 0 optcli sends a true burst, and GuideLLM's worker processes "
        "happen to spread theirs over ~100 ms, which the mock meets faster"))
    args = parser.parse_args(argv)
    if args.smoke:
        args.levels, args.ttft_ms, args.itl_ms, args.repeats, args.hog = "2:4", 5.0, 1.0, 1, 0
        if find_guidellm(args.guidellm, required=False) is None:
            print("skipped: guidellm is not installed (pip install guidellm, or pass --guidellm PATH)")
            return
    guidellm = find_guidellm(args.guidellm)
    sys.path.insert(0, str(ROOT))
    from optcli.checkpoints.resolve import resolve_model

    tokenizer = str(resolve_model("builtin:tiny-llama").path)
    levels = [tuple(int(x) for x in level.split(":")) for level in args.levels.split(",")]
    print(f"mock: TTFT {args.ttft_ms:g} ms, ITL {args.itl_ms:g} ms; prompts {PROMPT_TOKENS} tokens, "
          f"{OUTPUT_TOKENS} out; {os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.2f}; "
          f"{args.hog} busy-loop process(es); rampup {args.rampup:g} s")
    rows = []
    with tempfile.TemporaryDirectory() as tmp, mock_server(guidellm, args.ttft_ms, args.itl_ms) as url, hogs(args.hog):
        run_optcli(url, 2, 4)  # warm the caches (imports, tokenizer) outside the figures
        for streams, requests in levels:
            ours, theirs = [], []
            for _ in range(args.repeats):  # interleaved, so a busy moment hits both
                theirs.append(run_guidellm(guidellm, url, tokenizer, streams, requests, Path(tmp), args.rampup))
                ours.append(run_optcli(url, streams, requests, args.rampup))
            rows.append((streams, requests, ours, theirs))
    print(f"\n{'in flight':>9} {'requests':>8} | {'TTFT p50 ms':>27} | {'ITL p50 ms':>27} | {'our TPOT':>8}")
    print(f"{'':>9} {'':>8} | {'GuideLLM':>8} {'optcli':>8} {'ratio':>9} | {'GuideLLM':>8} {'optcli':>8} "
          f"{'ratio':>9} | {'p50 ms':>8}")
    verdicts = []
    for streams, requests, ours, theirs in rows:
        med = {k: (statistics.median(r[k] for r in ours), statistics.median(r[k] for r in theirs))
               for k in ("ttft", "itl")}
        tpot = statistics.median(r["tpot"] for r in ours)
        ratio = {k: med[k][0] / med[k][1] for k in ("ttft", "itl")}
        within = all(abs(r - 1) <= 0.10 for r in ratio.values())
        verdicts.append(within)
        print(f"{streams:>9} {requests:>8} | {med['ttft'][1]:>8.1f} {med['ttft'][0]:>8.1f} {ratio['ttft']:>8.3f}x | "
              f"{med['itl'][1]:>8.1f} {med['itl'][0]:>8.1f} {ratio['itl']:>8.3f}x | {tpot:>8.1f}"
              f"   {'PASS' if within else 'MISS'} (within 10%)")
        for side, runs in (("GuideLLM", theirs), ("optcli", ours)):
            if any(r["completed"] != requests for r in runs):
                print(f"  note: {side} completed {[r['completed'] for r in runs]} of {requests} requests")
    print(f"\ntarget: TTFT and ITL p50 within 10% of GuideLLM's at every level: "
          f"{'PASS' if all(verdicts) else 'MISS'} (informational; exit status 0)")


if __name__ == "__main__":
    main()
