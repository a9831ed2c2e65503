"""Model-level evaluation: perplexity, per-example loss, agreement with a teacher, candidate scoring
and canary exposure."""

from secure_kd.evaluate.candidates import canary_exposure, score_candidates
from secure_kd.evaluate.language_model import per_example_loss, perplexity, teacher_agreement

__all__ = ["canary_exposure", "per_example_loss", "perplexity", "score_candidates", "teacher_agreement"]
