"""One cost function: `usd_per_1k_tokens` (prompt + generated) and `usd_per_1k_output_tokens` mean
the same in profile's report.json, in `optcli roi` and in the rendered reports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from optcli.report import render_html, render_markdown
from optcli.roi.analysis import RoiOptions, compute_roi
from optcli.roi.cost import cost_per_1k, usd_per_1k

PRICE, TOTAL_TOK_S, OUTPUT_TOK_S = 2.5, 1234.5, 321.0


def test_cost_by_hand() -> None:
    """$3.60/h at 2,000 tok/s total and 500 generated: $0.0005 per 1K tokens, $0.002 per 1K output tokens."""
    assert cost_per_1k(3.6, 2000, 500) == {"usd_per_1k_tokens": pytest.approx(0.0005),
                                           "usd_per_1k_output_tokens": pytest.approx(0.002)}
    assert usd_per_1k(3.6, 2000) == pytest.approx(0.0005)


@pytest.mark.parametrize(("price", "total", "output"), [(None, 2000, 500), (3.6, None, None), (3.6, 0, 0),
                                                        (0, 2000, 500), (3.6, float("nan"), None)])
def test_missing_figures_are_null_not_made_up(price, total, output) -> None:
    assert cost_per_1k(price, total, output) == {"usd_per_1k_tokens": None, "usd_per_1k_output_tokens": None}


def profile_report() -> dict:
    """A report.json as profile writes it: throughput measured, cost from the same function."""
    return {"model": "elsewhere/model", "recipe": "w4a16-gptq", "hardware": {"device": "cpu", "name": "x"},
            "workload": {"prompt_len": [16, 64], "output_len": 32, "concurrency": 4},
            "throughput": {"total_tok_s": TOTAL_TOK_S, "output_tok_s": OUTPUT_TOK_S, "requests_s": 1.0},
            "cost": {**cost_per_1k(PRICE, TOTAL_TOK_S, OUTPUT_TOK_S), "gpu_hour_cost_usd": PRICE}}


def test_profile_report_and_roi_agree(tmp_path: Path) -> None:
    report = profile_report()
    path = tmp_path / "report.json"
    path.write_text(json.dumps(report))
    out = compute_roi(RoiOptions(report=path))  # priced at the report's own --gpu-hour-cost
    assert out["inputs"]["gpu_hour_cost_usd"] == {"value": PRICE, "source": "report"}
    assert out["usd_per_1k_tokens"] == report["cost"]["usd_per_1k_tokens"]
    assert out["usd_per_1k_output_tokens"] == report["cost"]["usd_per_1k_output_tokens"]
    assert out["usd_per_1k_tokens"] == pytest.approx(PRICE / (TOTAL_TOK_S * 3.6))  # per total, not per output
    assert out["usd_per_1k_output_tokens"] == pytest.approx(PRICE / (OUTPUT_TOK_S * 3.6))
    flagged = compute_roi(RoiOptions(report=path, gpu_hour_cost=PRICE))
    assert (flagged["usd_per_1k_tokens"], flagged["usd_per_1k_output_tokens"]) == (
        out["usd_per_1k_tokens"], out["usd_per_1k_output_tokens"])


def test_reports_render_both_cost_figures() -> None:
    for text in (render_markdown(profile_report()), render_html(profile_report())):
        assert "USD / 1k tokens, prompt + generated" in text and "USD / 1k output tokens" in text
        assert "0.0005625" in text and "0.002163" in text  # 2.5 / (1234.5 x 3.6), 2.5 / (321 x 3.6)
