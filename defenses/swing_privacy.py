"""Swing distillation's building blocks, now in the engine: re-exported from `secure_kd.swing_targets`.

One copy only: the detectors, the token scores and the target transform live in
`secure_kd.swing_targets` (so `kd.swing` of `secure-kd distill` can use them); this name stays until
every importer reads them from there.
"""

from secure_kd.swing_targets import (  # noqa: F401
    DETECTORS,
    Detector,
    NERHook,
    Span,
    SwingTargets,
    content_keys,
    detect_spans,
    position_scores,
    private_spans,
    spans_to_token_scores,
    swing_teacher_logits,
    token_privacy_scores,
)
