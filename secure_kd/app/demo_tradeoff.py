"""The demo's privacy against utility: a reference membership attack with the teacher as the reference
model, the privacy-utility plot, and which comparisons are at matched utility.

Part of the app layer (used by `secure_kd.app.demo_story` only). The reference attack here is the loss
ratio of Carlini et al. (2022, "LiRA offline" in its simplest form; Watson et al. 2022 call it the
difficulty-calibrated loss): score = teacher loss - model loss per record, higher = member. The teacher
never saw the private corpus, so a record the model finds easier than the teacher does is evidence of
training on it; templated records that every model finds easy are calibrated away, which the plain loss
attack cannot do. It is a small function kept here until the reference-based scorer of the audit
(`secure-kd audit --reference`) replaces it.

Matched utility: two models are compared at matched utility when their held-out perplexities are within
`MATCHED_RATIO` of each other; a privacy difference between models further apart may only mean that one
learned less.
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

MATCHED_RATIO = 1.25


def record_losses(model_dir: str | Path, texts: Sequence[str], *, max_length: int = 48) -> list[float]:
    """Mean next-token loss of each text (its first `max_length` tokens) under the model in `model_dir`."""
    import torch

    from secure_kd.model_files import load_pretrained, load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    model = load_pretrained(model_dir).eval()
    out: list[float] = []
    with torch.no_grad():
        for start in range(0, len(texts), 16):
            encoded = [tokenizer(t)["input_ids"][:max_length] for t in texts[start : start + 16]]
            width = max(len(e) for e in encoded)
            ids = torch.zeros((len(encoded), width), dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, seq in enumerate(encoded):
                ids[row, : len(seq)], mask[row, : len(seq)] = torch.tensor(seq), 1
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
            keep = mask[:, 1:].float()
            out.extend(((nll * keep).sum(1) / keep.sum(1).clamp(min=1)).tolist())
    return out


def reference_attack_auc(
    model_losses: Sequence[float], reference_losses: Sequence[float], is_member: Sequence[bool]
) -> dict[str, Any]:
    """AUC (with a 95% bootstrap interval) of the loss-ratio attack and of the plain loss attack."""
    import numpy as np

    from secure_kd.metrics import bootstrap_ci, roc_metrics

    model, reference = np.asarray(model_losses, float), np.asarray(reference_losses, float)
    member = np.asarray(is_member, bool)
    ratio = reference - model

    def auc(rows: np.ndarray) -> float:
        labels = rows[:, 1].astype(bool)
        if labels.all() or not labels.any():
            return float("nan")
        with warnings.catch_warnings():  # the TPR-at-low-FPR size warning: only the AUC is used here
            warnings.simplefilter("ignore", UserWarning)
            return float(roc_metrics(rows[:, 0], labels)["auc"])

    results = {}
    for name, score in (("reference", ratio), ("loss", -model)):
        rows = np.column_stack([score, member.astype(float)])
        low, high = bootstrap_ci(rows, auc, n=300)
        results[name] = {"auc": auc(rows), "ci": [low, high]}
    return results


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
