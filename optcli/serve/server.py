"""Start the built-in engine behind the HTTP app, and stop it cleanly on SIGTERM/SIGINT.

uvicorn owns the signals: it stops accepting connections and waits for in-flight requests (up to
the graceful timeout); after it returns, the engine thread aborts anything left and joins.
"""

from __future__ import annotations

import contextlib
import logging
import signal

from optcli.config import EngineConfig

log = logging.getLogger("optcli.serve")


def _graceful_server(config):
    """uvicorn's server, but after a graceful SIGTERM/SIGINT shutdown the process exits 0; stock
    uvicorn re-raises the signal after shutting down, which kills the process with it."""
    import uvicorn

    class Server(uvicorn.Server):
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
) -> None:
    import uvicorn

    from optcli.engine import Engine
    from optcli.engine.async_engine import AsyncEngine
    from optcli.serve.app import create_app

    engine = Engine(model_path, config)
    log.warning("serving %s on %s in %s (%s)", served_model_name, engine.device, engine.config.dtype, engine.dtype_reason)
    async_engine = AsyncEngine(engine)
    app = create_app(async_engine, served_model_name, api_key=api_key, max_waiting=max_waiting)
    try:
        config = uvicorn.Config(app, host=host, port=port, log_level="warning",
                                timeout_graceful_shutdown=graceful_timeout_s)
        _graceful_server(config).run()
    finally:
        async_engine.shutdown()
