"""Model-level evaluation: perplexity, per-example loss, agreement with a teacher, candidate scoring
and canary exposure; bits per byte and agreement across tokenizers."""

from secure_kd.evaluate.bytes import bits_per_byte, paired_batches
from secure_kd.evaluate.candidates import canary_exposure, score_candidates
from secure_kd.evaluate.cross_agreement import cross_tokenizer_agreement, top1_predictions
from secure_kd.evaluate.language_model import per_example_loss, perplexity, teacher_agreement

__all__ = [
    "bits_per_byte",
    "canary_exposure",
    "cross_tokenizer_agreement",
    "paired_batches",
    "per_example_loss",
    "perplexity",
    "score_candidates",
    "teacher_agreement",
    "top1_predictions",
]
