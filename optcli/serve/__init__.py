"""OpenAI-compatible HTTP serving around `optcli.engine.AsyncEngine`: the app factory (`app.create_app`),
one module per route family (`routes_completions`, `routes_chat`, `routes_admin`), the state they share
(`state.ServeState`), request checks (`requests`), admission control (`admission`), error bodies
(`api_errors`), streaming and SSE (`streaming`), logprob rendering (`logprobs`), the wire models
(`protocol`), Prometheus metrics (`metrics`), the uvicorn runner (`server`) and the vLLM hand-off
(`vllm`). Modules here may import optcli.engine, optcli.config, optcli.errors and optcli.util; never
optcli.cli, bench, quantize, calibration or roi.
"""
