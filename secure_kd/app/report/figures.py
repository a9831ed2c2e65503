"""Matplotlib figures of an audit, each returned as a base64 PNG (embedded in report.html as a data URI)."""

from __future__ import annotations

import base64
import io
import math
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _png(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def roc_figure(result: dict[str, Any], title: str) -> str | None:
    """Membership: every attack's empirical ROC, log-log (the low-FPR region is what matters)."""
    rocs = result.get("attacks") or []
    if not rocs:
        return None
    fig, (ax_lin, ax_log) = plt.subplots(1, 2, figsize=(9, 4))
    for roc in rocs:
        label = f"{roc['attack']} (AUC {roc['auc']:.3f})"
        ax_lin.plot(roc["roc_fpr"], roc["roc_tpr"], label=label)
        ax_log.plot(roc["roc_fpr"], roc["roc_tpr"], label=label)
    floor = 1.0 / max(1, max(int(r["n_nonmembers"]) for r in rocs))
    for ax in (ax_lin, ax_log):
        ax.plot([0, 1], [0, 1], "k:", linewidth=1, label="guessing")
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
    ax_log.set_xscale("log")
    ax_log.set_yscale("log")
    ax_log.set_xlim(floor / 2, 1)
    ax_log.set_ylim(floor / 2, 1.05)
    ax_lin.legend(fontsize=7, loc="lower right")
    ax_lin.set_title("ROC")
    ax_log.set_title("ROC, log scale")
    fig.suptitle(title)
    return _png(fig)


def exposure_figure(result: dict[str, Any], title: str) -> str | None:
    """Memorization: per canary, the loss histogram of its secret space and where the canary falls."""
    canaries = [c for c in result.get("exposure") or [] if c.get("histogram")]
    if not canaries:
        return None
    cols = min(4, len(canaries))
    rows = math.ceil(len(canaries) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    for ax, canary in zip(axes.flat, canaries, strict=False):
        hist = canary["histogram"]
        edges, counts = hist["edges"], hist["counts"]
        widths = [b - a for a, b in zip(edges[:-1], edges[1:], strict=True)]
        ax.bar(edges[:-1], counts, width=widths, align="edge", color="#8aa", edgecolor="none")
        ax.axvline(hist["canary_loss"], color="crimson", linewidth=1.5)
        bits = (
            canary["exposure"]
            if canary.get("exposure") is not None
            else (canary.get("estimate") or {}).get("value")
        )
        ax.set_title(
            f"x{canary['repeats']}: {bits:.1f} bits" if bits is not None else f"x{canary['repeats']}",
            fontsize=9,
        )
        ax.set_xlabel("candidate loss", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(canaries) :]:
        ax.axis("off")
    fig.suptitle(f"{title}: secret-space losses (red: the inserted canary)")
    fig.tight_layout()
    return _png(fig)


def singular_value_figure(result: dict[str, Any], title: str) -> str | None:
    """Logit leak: singular values of the stacked logit matrix; the drop sits at the hidden size."""
    values = result.get("singular_values") or []
    if not values:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.semilogy(range(1, len(values) + 1), [max(v, 1e-30) for v in values], ".-", markersize=3)
    ax.axvline(result["estimated_hidden_size"], color="crimson", linestyle="--",
               label=f"estimated hidden size {result['estimated_hidden_size']}")  # fmt: skip
    if result.get("true_hidden_size"):
        ax.axvline(
            result["true_hidden_size"], color="k", linestyle=":", label=f"true {result['true_hidden_size']}"
        )
    ax.set_xlabel("index")
    ax.set_ylabel("singular value")
    ax.legend(fontsize=8)
    ax.set_title(title)
    return _png(fig)


def privacy_utility_figure(points: list[tuple[float, float, str]], utility_key: str) -> str | None:
    """Epsilon against utility for the DP runs given (two or more points)."""
    if len(points) < 2:
        return None
    points = sorted(points)
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot([p[0] for p in points], [p[1] for p in points], "o-")
    for eps, utility, label in points:
        ax.annotate(label, (eps, utility), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("epsilon")
    ax.set_ylabel(utility_key)
    ax.set_title("privacy / utility")
    return _png(fig)


FIGURES = {"membership": roc_figure, "memorization": exposure_figure, "logit_leak": singular_value_figure}
