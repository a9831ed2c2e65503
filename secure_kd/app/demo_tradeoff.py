"""The demo's privacy against utility: the privacy-utility plot, and which comparisons are at matched
utility.

Part of the app layer (used by `secure_kd.app.demo_story` only). The reference membership attack the
plot shows is the audit's (`secure-kd audit --reference`, `secure_kd.app.reference_audit`), with the
teacher as the reference model.

Matched utility: two models are compared at matched utility when their held-out perplexities are within
`MATCHED_RATIO` of each other; a privacy difference between models further apart may only mean that one
learned less.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

MATCHED_RATIO = 1.25


def matched_pairs(perplexities: dict[str, float | None], ratio: float = MATCHED_RATIO) -> list[tuple]:
    """(a, b, ppl ratio, matched) for every pair of named models with a perplexity."""
    named = [(k, v) for k, v in perplexities.items() if v is not None and math.isfinite(v)]
    pairs = []
    for i, (a, pa) in enumerate(named):
        for b, pb in named[i + 1 :]:
            r = max(pa, pb) / min(pa, pb)
            pairs.append((a, b, r, r <= ratio))
    return pairs


def privacy_utility_png(points: list[dict[str, Any]], path: Path) -> Path | None:
    """Held-out perplexity (log x) against exposure and against the reference-attack AUC, one point per
    model; None when matplotlib is missing (the summary table has the same numbers)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in (
        (axes[0], "exposure_bits", "canary exposure (bits, most exposed canary)"),
        (axes[1], "reference_auc", "membership AUC, teacher as reference"),
    ):
        for p in points:
            if p.get("perplexity") is None or p.get(key) is None:
                continue
            ax.scatter([p["perplexity"]], [p[key]], s=40)
            ax.annotate(p["label"], (p["perplexity"], p[key]), textcoords="offset points", xytext=(4, 4),
                        fontsize=8)  # fmt: skip
        ax.set_xscale("log")
        ax.set_xlabel("held-out perplexity (lower = more useful)")
        ax.set_ylabel(label)
    axes[1].axhline(0.5, color="k", linestyle=":", linewidth=1)
    teacher = next((p for p in points if p.get("teacher")), None)
    if teacher is not None:
        for ax in axes:
            ax.axvline(teacher["perplexity"], color="grey", linestyle="--", linewidth=1)
            ax.axvline(1.5 * teacher["perplexity"], color="grey", linestyle=":", linewidth=1)
    fig.suptitle("secure-kd demo: privacy against utility (dashed: teacher, dotted: 1.5x teacher)")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    path.write_bytes(buffer.getvalue())
    return path
