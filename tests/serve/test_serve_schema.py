"""schemathesis over the server's own OpenAPI schema (bounded): no input may produce a 5xx."""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, settings  # noqa: E402

from optcli.engine.async_engine import AsyncEngine  # noqa: E402
from optcli.engine.engine import Engine  # noqa: E402
from optcli.serve.app import create_app  # noqa: E402

_engine = AsyncEngine(Engine("builtin:tiny-llama", dtype="float32", max_num_seqs=4, max_model_len=256))
app = create_app(_engine, "tiny", request_timeout_s=30)
schema = schemathesis.openapi.from_asgi("/openapi.json", app)


@schema.parametrize()
@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_input_gives_a_5xx(case) -> None:
    if isinstance(case.body, dict) and isinstance(case.body.get("max_tokens"), int):
        case.body["max_tokens"] = min(case.body["max_tokens"], 8)  # keep generation short, not the validation
    response = case.call()
    assert response.status_code < 500, (case.method, case.path, case.body, response.text[:300])
