"""The vLLM hand-off, in one room: our options mapped onto `vllm serve`'s flags (`argv.py`), the process
`serve --engine vllm` execs into, and the child server `profile --engine vllm` measures (`server.py`).

It sits below bench and serve (both use it) and imports only config and errors; the mapping is read from
`EngineConfig`'s field declarations, so an engine option vLLM also has is mapped where it is declared.
"""
