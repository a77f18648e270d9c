"""Start the built-in engine behind the HTTP app, and stop it cleanly on SIGTERM/SIGINT.

uvicorn owns the signals: it stops accepting connections and waits for in-flight requests (up to
the graceful timeout); after it returns, the engine thread aborts anything left and joins.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import socket
import sys

from optcli.config import EngineConfig
from optcli.errors import UsageError

log = logging.getLogger("optcli.serve")


def bind_listener(host: str, port: int) -> socket.socket:
    """The server's listening socket, bound before the model loads: a port in use or a host that does
    not resolve is a usage error (exit 2) at once, and no other process can take the port meanwhile."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]
    except (socket.gaierror, UnicodeError) as e:
        raise UsageError(f"--host {host}: cannot resolve it ({getattr(e, 'strerror', None) or e})") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: restarts reuse TIME_WAIT ports
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise UsageError(f"cannot listen on {url_host(host)}:{port}: {e.strerror or e} "
                         "(another server there? pick another --port)") from None
    return sock


def url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _graceful_server(config, url: str | None = None):
    """uvicorn's server, but after a graceful SIGTERM/SIGINT shutdown the process exits 0; stock
    uvicorn re-raises the signal after shutting down, which kills the process with it. Once it
    accepts connections it prints `url` on stdout."""
    import uvicorn

    class Server(uvicorn.Server):
        async def startup(self, sockets=None) -> None:
            await super().startup(sockets)
            if self.started and url:
                print(f"optcli serve: listening on {url} (OpenAI API at {url}/v1)", flush=True)

        @contextlib.contextmanager
        def capture_signals(self):
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    return Server(config)


def run_server(
    model_path: str,
    served_model_name: str,
    host: str,
    port: int,
    api_key: str | None,
    config: EngineConfig,
    max_waiting: int,
    graceful_timeout_s: int = 30,
    sock: socket.socket | None = None,
    kpi=None,
) -> None:
    """Load the model and serve it; `sock` is a listener from `bind_listener` (bound here when None); `kpi`
    (`optcli.serve.kpi_monitor.KpiOptions`) watches a KPI file live."""
    import uvicorn

    from optcli.engine import Engine
    from optcli.engine.async_engine import AsyncEngine
    from optcli.serve.app import create_app

    sock = sock or bind_listener(host, port)
    engine = Engine(model_path, config)
    log.warning("serving %s on %s in %s (%s)", served_model_name, engine.device, engine.config.dtype, engine.dtype_reason)
    async_engine = AsyncEngine(engine)
    app = create_app(async_engine, served_model_name, api_key=api_key, max_waiting=max_waiting, kpi=kpi)
    try:
        config = uvicorn.Config(app, host=host, port=port, log_level="warning",
                                timeout_graceful_shutdown=graceful_timeout_s)
        _graceful_server(config, f"http://{url_host(host)}:{port}").run(sockets=[sock])
    finally:
        async_engine.shutdown()
        sock.close()
        sys.stdout.flush()
