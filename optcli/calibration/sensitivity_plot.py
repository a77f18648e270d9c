"""The sensitivity report as a bar chart: each layer's KLD alone, most sensitive first."""

from __future__ import annotations

from pathlib import Path

MAX_BARS = 64  # beyond this the names are unreadable; the JSON keeps every layer


def plot_sensitivity(report: dict, path: Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["layers"][:MAX_BARS]
    fig, ax = plt.subplots(figsize=(8, 0.22 * len(rows) + 1.6))
    try:
        names = [r["layer"].removeprefix("model.").replace("layers.", "") for r in rows]
        ax.barh(range(len(rows)), [r["kld"] for r in rows], color="#c0504d")
        ax.set_yticks(range(len(rows)), names, fontsize=7)
        ax.invert_yaxis()
        shown = f"top {len(rows)} of {len(report['layers'])}" if len(rows) < len(report["layers"]) else "all layers"
        ax.set_xlabel(f"KLD vs source, that layer alone at {report['scheme']} (nats/token)")
        ax.set_title(f"{title} per-layer sensitivity · {shown} · {report['tokens']} tokens".strip(), fontsize=9)
        for i, r in enumerate(rows):
            ax.text(r["kld"], i, f" {r['share']:.0%}", va="center", fontsize=6)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)
    return path
