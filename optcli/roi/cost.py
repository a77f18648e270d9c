"""The one cost function: what `profile` writes in report.json and what `roi` prints mean the same.

cost per 1K tokens = hourly price / (tokens/s x 3600) x 1000. `usd_per_1k_tokens` is on *total*
tokens (prompt + generated: what an API bills and what `roi`'s tokens/request counts);
`usd_per_1k_output_tokens` is on generated tokens only. Dependency-free so both sides import it.
"""

from __future__ import annotations


def usd_per_1k(hourly_usd: float | None, tok_s: float | None) -> float | None:
    """USD per 1,000 tokens at `tok_s` tokens/s; None where the price or the rate is missing or not positive."""
    if hourly_usd is None or tok_s is None or not hourly_usd > 0 or not tok_s > 0:
        return None
    return hourly_usd / (tok_s * 3600) * 1000


def cost_per_1k(hourly_usd: float | None, total_tok_s: float | None, output_tok_s: float | None) -> dict:
    """The report's and roi's cost figures from one price and the two throughputs (None where unknown)."""
    return {"usd_per_1k_tokens": usd_per_1k(hourly_usd, total_tok_s),
            "usd_per_1k_output_tokens": usd_per_1k(hourly_usd, output_tok_s)}
