#!/usr/bin/env bash
# quantize → profile → roi: is a 4-bit model worth it against a $0.06 / 1K-token API?
# Runs offline on a CPU with the built-in demo model; swap in your model, GPU and prices.
set -euo pipefail
WORK=${WORK:-$(mktemp -d)}

optcli quantize builtin:tiny-llama --recipe w4a16-rtn --out "$WORK/w4a16" --force --json > "$WORK/quantize.json"

# latency vs concurrency at 1, 4 and 8 requests in flight: the capacity plan reads it
optcli profile "$WORK/w4a16" --requests 16 --output-len 16 --concurrency 1,4,8 --out "$WORK/report" --json \
  > /dev/null

printf 'time,requests_per_s\n00:00,20\n06:00,60\n09:00,150\n12:00,220\n18:00,120\n22:00,30\n' > "$WORK/trace.csv"

# Priced as an L4 ($0.80/h, illustrative catalog default; pass --gpu-hour-cost for yours).
optcli roi --report "$WORK/report/report.json" --gpu L4 \
  --baseline-usd-per-1k-tokens 0.06 --requests-per-day 10000 --tokens-per-request 1000 \
  --implementation-cost 20000 --target-rps 200 --p95-slo-ms 500 \
  --load-trace "$WORK/trace.csv" --plot "$WORK/replicas.png"

# the same figures for scripts: one JSON object
optcli roi --report "$WORK/report/report.json" --gpu L4 \
  --baseline-usd-per-1k-tokens 0.06 --requests-per-day 10000 --tokens-per-request 1000 --implementation-cost 20000 --json \
  | python -c 'import json, sys; r = json.load(sys.stdin); print(r["recommendation"], round(r["payback_months"], 2))'
